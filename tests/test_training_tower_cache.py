"""cache_vision_features: a frozen tower's outputs served from memory must be the ones it computes.

Every family whose tower is cached is checked on its tiny model of the real class: the VLM's logits
with the cache (the rows computed in this batch, in another batch, or partly each) against the same
VLM without it. The towers that pack images into one sequence must be refused.
"""

from __future__ import annotations

import logging

import pytest
import torch

from lavender.tiny.vlm import build_tiny_vlm, save_tiny_vlm
from lavender.training.config import VISION_TOWERS, ConfigError, build_config
from lavender.training.setup import build_trainer, train
from lavender.training.tower_cache import cache_vision_towers
from student_helpers import CONVERSATIONS, make_batch, noise_image
from training_fixtures import run_keys, train_logs, write_records, write_targets

CACHED = ["llava", "mllama", "gemma3", "llava_next", "llava_onevision", "idefics3", "internvl", "smolvlm",
          "paligemma", "idefics"]
PACKED = ["qwen2_vl", "qwen3_vl", "minicpmv4_6", "minicpmv"]


def _frozen(kind: str):
    model, processor = build_tiny_vlm(kind)
    model.eval()
    for name, module in model.named_modules():
        if name.split(".")[-1] in VISION_TOWERS:
            module.requires_grad_(False)
    return model, processor


def _logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("kind", CACHED)
def test_cached_features_give_the_logits_of_the_computed_ones(kind):
    model, processor = _frozen(kind)
    a, b, c = (noise_image(90, 60, seed) for seed in (1, 2, 3))
    first = make_batch(kind, processor, [a, b])
    again = make_batch(kind, processor, [b, a], CONVERSATIONS[::-1])  # both rows seen, in another order
    mixed = make_batch(kind, processor, [a, c])  # one row seen, one new
    expected = [_logits(model, inputs) for inputs in (first, again, mixed)]

    caches = cache_vision_towers(model, VISION_TOWERS)
    got = [_logits(model, inputs) for inputs in (first, again, mixed)]
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    # a, b, c computed once; `again` served a and b, `mixed` a (an image may be several rows: tiles)
    computed, served = sum(cache.misses for cache in caches), sum(cache.hits for cache in caches)
    assert computed > 0 and served == computed

    for cache in caches:
        cache.close()
        assert "forward" not in vars(cache.tower) and not cache.outputs
    torch.testing.assert_close(_logits(model, mixed), expected[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", PACKED)
def test_towers_that_pack_images_into_one_sequence_are_refused(kind):
    model, _ = _frozen(kind)
    with pytest.raises(ValueError, match="not known to encode each image on its own"):
        cache_vision_towers(model, VISION_TOWERS)


def test_one_pass_per_image_and_the_output_each_call_asked_for():
    model, _ = _frozen("llava")
    tower = model.model.vision_tower
    pair = torch.randn(1, 3, 84, 84).repeat(2, 1, 1, 1)  # one image twice in a batch
    cache = cache_vision_towers(model, VISION_TOWERS)[0]
    first = tower(pair, return_dict=True)
    assert (cache.misses, cache.hits) == (1, 1) and torch.equal(first.pooler_output[0], first.pooler_output[1])
    assert isinstance(tower(pair, return_dict=False), tuple) and cache.misses == 2  # other arguments, other key
    assert type(tower(pair, return_dict=True)) is type(first) and cache.misses == 2  # served as it was asked for
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tower(pair, return_dict=True)
    assert cache.misses == 3  # features made under autocast are not served to float32 calls, nor the reverse
    with pytest.raises(ValueError, match="no key can hold"):
        tower(pair, interpolate_pos_encoding=[False])
    cache.close()
    cache.close()  # twice is harmless
    assert "forward" not in vars(tower)


def test_a_trained_or_dropping_tower_is_refused():
    model, _ = build_tiny_vlm("llava")
    with pytest.raises(ValueError, match="is trained in this run"):
        cache_vision_towers(model, VISION_TOWERS)
    model.model.vision_tower.requires_grad_(False)
    model.model.vision_tower.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match="applies dropout"):
        cache_vision_towers(model, VISION_TOWERS)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tower_cache")
    manifest = write_records(root / "records")
    return root, manifest, write_targets(root / "targets", manifest, resolution=8)


@pytest.mark.parametrize(("kind", "frozen_by"), [("llava", "freeze_vision"), ("mllama", "freeze_vision"),
                                                 ("llava", "lora")])
def test_a_cached_run_trains_as_an_uncached_one(world, kind, frozen_by, caplog):
    root, manifest, targets = world
    model = save_tiny_vlm(kind, root / kind)
    frozen = {"use_peft": False, "freeze_vision": True} if frozen_by == "freeze_vision" else {"use_peft": True}
    logs = {}
    for cached in (False, True):
        keys = run_keys(root, model, manifest, targets, f"{kind}-{frozen_by}-{cached}", **frozen,
                        cache_vision_features=cached, max_steps=6, learning_rate=1e-3, seed=3)
        with caplog.at_level(logging.INFO, logger="lavender.training.setup"):
            logs[cached] = train_logs(train(build_config(keys)))
    # 4 records, batch 2: the first epoch computes each image once, the next two are served
    assert "4 image rows computed, 8 served from the cache" in caplog.text
    for plain, cached in zip(logs[False], logs[True], strict=True):
        for name in ("loss", "lm_loss", "att_loss"):
            assert float(cached[name]) == pytest.approx(float(plain[name]), rel=1e-3, abs=1e-5)


def test_the_cache_needs_a_frozen_tower_and_unsharded_training(world):
    root, manifest, targets = world
    model = save_tiny_vlm("llava", root / "llava-config")
    with pytest.raises(ConfigError, match="needs a frozen vision tower"):
        build_config(run_keys(root, model, manifest, targets, "a", use_peft=False, cache_vision_features=True))
    with pytest.raises(ConfigError, match="needs a frozen vision tower"):
        build_config(run_keys(root, model, manifest, targets, "b", lora_vision=True, cache_vision_features=True))
    with pytest.raises(ConfigError, match="FSDP or DeepSpeed"):
        build_trainer(build_config(run_keys(root, model, manifest, targets, "c", cache_vision_features=True,
                                            fsdp="full_shard")))
