"""``LavenderTrainer``: ``transformers.Trainer`` with the attention alignment loss added.

    L_total = L_LM + λ(t) · L_att      (L_LM left out during an ``alignment`` warm-up)

Being a ``Trainer`` brings ``accelerate`` (DDP, FSDP, DeepSpeed), gradient accumulation,
checkpoints and resume, and the ``report_to`` loggers. What this class adds:

* ``compute_loss`` pops the collator's ``lavender_*`` keys and runs the model inside
  ``capture.record``; a forward hook on the transformers model turns the captured maps into
  L_att through the alignment head while the forward is still running (where DDP, FSDP and
  ZeRO-3 expect parameters to be used);
* L_att is normalised like the LM loss: the LM loss is a sum over tokens divided by the number of
  supervised tokens of the whole accumulated (and, by default, distributed) batch, so L_att is a
  sum over matched words divided by the number of matched words of that same batch (counted in
  ``get_batch_samples``, next to the Trainer's own token count);
* the alignment head (aligner) is a submodule of the model named ``lavender_head``, so DDP
  reduces its gradients and the optimizer sees it; it is saved to its own safetensors file in
  every checkpoint and restored on resume, so a resumed run continues the same loss curve;
* ``lm_loss``, ``att_loss``, ``att_weight``, ``lm_weight`` (0 during an ``alignment`` warm-up) and
  the word/record counts go into the log history next to ``loss``; every ``att_every_n_steps`` a figure of teacher vs VLM maps is written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer

from lavender.alignment import (
    AlignmentHead,
    AttentionWeight,
    attention_loss,
    per_word_visibility,
    restrict_to_visible,
    sharpen_maps,
    visible_word_rows,
    word_maps,
)
from lavender.files import file_stem, write_atomic
from lavender.training.config import RUN_CONFIG_FILE
from lavender.training.data import BATCH_KEYS, COUNT_NAMES, COUNTS_KEY, EXAMPLES_KEY, Example
from lavender.training.tower_cache import TowerCache

HEAD_NAME = "lavender_head"
HEAD_FILE = "lavender_head.safetensors"


@dataclass
class _AlignmentRequest:
    """What the forward hook needs from the batch to compute L_att."""

    query_positions: torch.Tensor
    word_rows: torch.Tensor
    targets: torch.Tensor
    word_mask: torch.Tensor
    image_sizes: list[tuple[int, int]]
    detach_maps: bool


@dataclass
class _Aligned:
    att_sum: torch.Tensor  # Σ over matched words of the per-word loss (MSE or KL), with grad
    predicted: torch.Tensor  # (N, R, R), detached: for figures
    visible: torch.Tensor  # (N, R, R) bool: the cells the VLM sees (its processor may crop the image)
    word_mask: torch.Tensor  # (B, W): the words that got a map


def transformers_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model`` (itself, or under PEFT)."""
    return next(module for module in model.modules() if isinstance(module, PreTrainedModel))


def save_head(head: AlignmentHead, directory: str | os.PathLike) -> Path:
    from safetensors.torch import save

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in head.state_dict().items()}
    return write_atomic(Path(directory) / HEAD_FILE, save(state, metadata=head.describe()))


def save_run_config(keys: dict[str, Any], directory: str | os.PathLike) -> Path:
    import yaml

    return write_atomic(Path(directory) / RUN_CONFIG_FILE, yaml.safe_dump(keys, sort_keys=True))


def load_head(directory: str | os.PathLike) -> AlignmentHead:
    """The trained alignment head saved next to a model (``lavender_head.safetensors``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(directory) / HEAD_FILE
    with safe_open(str(path), framework="pt") as handle:
        description = handle.metadata()
    head = AlignmentHead.from_description(description)
    head.load_state_dict(load_file(str(path)))
    return head


class LavenderTrainer(Trainer):
    """A ``Trainer`` whose loss adds λ·L_att (see the module docstring)."""

    def __init__(
        self,
        *args: Any,
        capture,
        head: AlignmentHead,
        resolution: int,
        target_normalization: str,
        target_power: float = 1.0,
        att_loss: str = "mse",
        image_token_id: int | None,
        att_weight: AttentionWeight,
        aligner_warmup_steps: int = 0,
        aligner_warmup: str = "aligner",
        att_every_n_steps: int = 0,
        tower_caches: Sequence[TowerCache] = (),
        run_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.capture = capture
        self.head = head
        self.resolution = resolution
        self.target_normalization = target_normalization  # the store's: a cropped target is renormalised as it was made
        self.target_power = target_power
        self.att_loss = att_loss  # lavender.alignment.ATTENTION_LOSSES
        self.image_token_id = image_token_id
        self.att_weight = att_weight
        self.aligner_warmup_steps = aligner_warmup_steps
        self.aligner_warmup = aligner_warmup
        self.att_every_n_steps = att_every_n_steps
        self.tower_caches = tower_caches  # lavender.training.tower_cache: closed by setup.train
        self.run_config = run_config  # saved beside every model, checkpoints and adapter/ included
        self._words_in_batch: torch.Tensor | None = None
        self._request: _AlignmentRequest | None = None
        self._aligned: _Aligned | None = None
        transformers_model(self.model).register_forward_hook(self._align_in_forward, with_kwargs=True)
        self._running = self._zero_running()
        self._steps_running: set[int] = set()  # optimizer steps summed in ``_running``
        self._att_weight_now = att_weight.initial
        self._lm_weight_now = 1.0
        self._last_figure_step = -1
        self._parameters_for_flos: int | None = None

    # ---- loss ---------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        # matched words of the whole accumulated batch (all processes): L_att's denominator
        words = sum(
            (batch["lavender_word_mask"].sum() for batch in batch_samples if "lavender_word_mask" in batch),
            torch.tensor(0),
        ).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            words = self.accelerator.gather(words.reshape(1)).sum()
        self._words_in_batch = words
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "lavender_word_mask" not in inputs:  # a plain batch (e.g. evaluation without targets)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        query_positions, word_rows, targets, word_mask = (inputs.pop(key) for key in BATCH_KEYS)
        targets = sharpen_maps(targets, self.target_power, self.target_normalization)
        counts = inputs.pop(COUNTS_KEY)
        examples = inputs.pop(EXAMPLES_KEY)
        step = self.state.global_step
        warming_up = step < self.aligner_warmup_steps
        self._aligned = None
        self._request = _AlignmentRequest(
            query_positions=query_positions,
            word_rows=word_rows,
            targets=targets,
            word_mask=word_mask,
            image_sizes=[(example.image.height, example.image.width) for example in examples],
            detach_maps=warming_up and self.aligner_warmup == "aligner",
        )
        try:
            if self.head.parallel is None:
                with self.capture.record(query_positions):
                    lm_loss, outputs = super().compute_loss(
                        model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
                    )
            else:
                inputs = {**inputs, "output_hidden_states": True}
                lm_loss, outputs = super().compute_loss(
                    model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
                )
        finally:
            self._request = None
        aligned = self._aligned
        if aligned is None:
            raise RuntimeError("the alignment hook did not run: was the model called through another module?")
        att_loss = aligned.att_sum / self._att_denominator(aligned.word_mask) * self._att_scale(num_items_in_batch)
        weight = self.att_weight(step, self.state.max_steps)
        # the authors' alignment-only warm-up weights L_LM by 1e-7; 0 is the same, said plainly
        lm_weight = 0.0 if warming_up and self.aligner_warmup == "alignment" else 1.0
        loss = lm_weight * lm_loss + weight * att_loss

        self._accumulate(lm_loss, att_loss, weight, lm_weight, counts, num_items_in_batch)
        if self._figure_due(step):
            predicted = aligned.predicted.masked_fill(~aligned.visible, float("nan"))  # unseen: left blank
            self._save_figure(step, examples[0], predicted, targets[aligned.word_mask], aligned.word_mask)
        return (loss, outputs) if return_outputs else loss

    def _align_in_forward(self, module, args, kwargs, outputs):
        """Forward hook of the transformers model: L_att's sum, computed inside the model's forward.

        Inside, so that DDP finds the aligner's parameters from the forward's outputs, FSDP has the
        root's parameters gathered, and ZeRO-3 gathers the head's as it is called.
        """
        request = self._request
        if request is None:
            return None
        self._request = None  # one alignment per forward; plain forwards (generation, eval) pass through
        model_inputs = kwargs  # the Trainer (and PEFT after it) call the model with keywords only
        adapter = self.capture.adapter
        query_mask = adapter.query_mask(model_inputs, request.query_positions)
        rows, word_mask = visible_word_rows(
            query_mask & (request.query_positions >= 0), request.word_rows, request.word_mask
        )
        # Words are averaged over their rows before placement on the grid (placement is linear):
        # memory then grows with words × grid, not rows × grid.
        if self.head.parallel is None:
            maps = self.capture.word_maps(model_inputs, rows, self.resolution, request.image_sizes)
        else:
            image_mask = model_inputs["input_ids"] == self.image_token_id
            probs = self.head.parallel_probs(outputs.hidden_states, request.query_positions, image_mask)
            per_word = word_maps(probs, rows).permute(0, 2, 3, 1, 4)  # (B, L, H, W, S): words as rows
            maps = adapter.place(per_word, model_inputs, self.resolution, request.image_sizes).permute(0, 3, 1, 2, 4, 5)

        # both maps cover the whole image; cells the VLM's processor cut off are left out
        visible = self.capture.visibility(model_inputs, self.resolution, request.image_sizes).to(maps.device)
        predicted = self.head(maps, word_mask, detach_maps=request.detach_maps, visible=visible)
        visible = per_word_visibility(visible, word_mask)
        targets = restrict_to_visible(
            request.targets[word_mask].to(predicted.dtype), visible, self.target_normalization
        )
        per_word = attention_loss(predicted, targets, visible, self.att_loss)
        # the zero term keeps the head in the graph when no word matched, so every process
        # reduces the head's gradients on every step
        att_sum = per_word.sum() + sum(p.sum() for p in self.head.parameters()) * 0.0
        self._aligned = _Aligned(
            att_sum=att_sum, predicted=predicted.detach(), visible=visible, word_mask=word_mask
        )
        if outputs.loss is not None:
            # DDP (find_unused_parameters) finds a step's parameters by walking back from the
            # forward's outputs: tie the head to them, with weight 0
            outputs.loss = outputs.loss + 0.0 * att_sum
        return outputs

    def _att_denominator(self, word_mask: torch.Tensor) -> torch.Tensor:
        if self._words_in_batch is None or not self.model.training:
            return word_mask.sum().clamp_min(1)
        return self._words_in_batch.to(word_mask.device).clamp_min(1)

    def _att_scale(self, num_items_in_batch) -> float:
        """What the Trainer will undo, applied to L_att as it is to L_LM.

        A loss normalised over the whole batch is multiplied by the number of processes (DDP
        averages gradients); a per-micro-batch loss is divided by the accumulation steps by the
        Trainer, which L_att, already normalised over the accumulated batch, must not suffer.
        """
        if not self.model.training:
            return 1.0
        scale = 1.0
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            scale *= self.accelerator.num_processes
        if not self._lm_loss_is_scaled(num_items_in_batch):
            scale *= self._accumulation_steps
        return scale

    @property
    def _accumulation_steps(self) -> int:
        # set by the training loop per step (the last step of an epoch may have fewer batches)
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def _lm_loss_is_scaled(self, num_items_in_batch) -> bool:
        # the class attribute exists from transformers 5.2x; earlier versions apply the rule below
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's estimate (6 × tokens × parameters), with the parameters counted once.

        The Trainer counts them on every step, a walk over every module that costs a small model
        several percent of its step; the count does not change while training.
        """
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameters_for_flos is None:
            self._parameters_for_flos = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._parameters_for_flos

    # ---- logging --------------------------------------------------------------------------------

    def _zero_running(self) -> dict[str, torch.Tensor]:
        return {name: torch.zeros(()) for name in ("lm_loss", "att_loss", *COUNT_NAMES)}

    def _accumulate(self, lm_loss, att_loss, weight, lm_weight, counts, num_items_in_batch) -> None:
        """Per optimizer step, the same sums the Trainer forms for ``loss``."""
        if not self.model.training:
            return
        per_step = 1.0 if self._lm_loss_is_scaled(num_items_in_batch) else 1.0 / self._accumulation_steps
        self._running["lm_loss"] += lm_loss.detach().float().cpu() * per_step
        self._running["att_loss"] += att_loss.detach().float().cpu() * per_step
        for name, value in zip(COUNT_NAMES, counts.detach().float().cpu()):
            self._running[name] += value
        self._steps_running.add(self.state.global_step)
        self._att_weight_now = weight
        self._lm_weight_now = lm_weight

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            steps = max(len(self._steps_running), 1)
            device = self.args.device
            stacked = torch.stack([self._running[name] for name in ("lm_loss", "att_loss", *COUNT_NAMES)]).to(device)
            gathered = self.accelerator.gather(stacked.reshape(1, -1)).reshape(-1, stacked.numel())
            means, sums = gathered.mean(dim=0) / steps, gathered.sum(dim=0)
            logs["lm_loss"] = round(means[0].item(), 6)
            logs["att_loss"] = round(means[1].item(), 6)
            logs["att_weight"] = self._att_weight_now
            logs["lm_weight"] = self._lm_weight_now
            for index, name in enumerate(COUNT_NAMES, start=2):
                logs[name] = int(sums[index].item())
            self._running = self._zero_running()
            self._steps_running.clear()
        super().log(logs, start_time)

    # ---- figures --------------------------------------------------------------------------------

    def _figure_due(self, step: int) -> bool:
        return (
            self.att_every_n_steps > 0
            and step % self.att_every_n_steps == 0
            and step != self._last_figure_step
            and self.model.training
            and self.args.should_save
        )

    def _save_figure(self, step: int, example: Example, predicted, targets, word_mask) -> None:
        """The batch's first sample: its image, the teacher's maps and the VLM's (after the aligner)."""
        from lavender.figures import plot_word_maps

        self._last_figure_step = step
        # masked words are flattened sample by sample, so the first sample's come first, in order
        keys = [key for key, kept in zip(example.keys, word_mask[0].tolist()) if kept]
        if not keys:
            return
        teacher = targets[: len(keys)].float().cpu().numpy()
        vlm = predicted[: len(keys)].float().cpu().numpy()
        # a record id is data, not a path: `../../x` must not leave the figures folder
        path = Path(self.args.output_dir) / "figures" / f"maps_step_{step:07d}_{file_stem(example.record_id)}.png"
        rows = {"teacher": dict(zip(keys, teacher)), "VLM": dict(zip(keys, vlm))}
        plot_word_maps(example.image, rows, path)
        self._report_figure(path, step)

    def _report_figure(self, path: Path, step: int) -> None:
        """Hand the figure to the loggers that take images (TensorBoard, Weights & Biases)."""
        import numpy as np
        from PIL import Image
        from transformers.integrations import TensorBoardCallback, WandbCallback

        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and getattr(callback, "tb_writer", None) is not None:
                pixels = np.asarray(Image.open(path).convert("RGB"))
                callback.tb_writer.add_image("lavender/maps", pixels, step, dataformats="HWC")
            elif isinstance(callback, WandbCallback) and getattr(callback, "_wandb", None) is not None:
                if callback._wandb.run is not None:
                    callback._wandb.log({"lavender/maps": callback._wandb.Image(str(path))}, commit=False)

    # ---- saving and resuming ----------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model)
        if state_dict is None:
            state_dict = unwrapped.state_dict()
        # the head has its own file; the model's weights stay loadable by plain transformers
        state_dict = {k: v for k, v in state_dict.items() if HEAD_NAME not in k.split(".")}
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            save_head(self.head, output_dir)
            if self.run_config is not None:
                save_run_config(self.run_config, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / HEAD_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{resume_from_checkpoint} has no {HEAD_FILE}: it was not written by `lavender train`, "
                "so the aligner cannot be restored"
            )
        from safetensors.torch import load_file

        self.head.load_state_dict(load_file(str(path)))
