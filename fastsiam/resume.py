"""What a resumed run may change, and where its epoch restarts when the batch size changed.

``--resume`` continues a run from its checkpoint, and the checkpoint stores the resolved config
it was trained with. A key that changes the training trajectory (the data, the model, the
batch size, the seed, the optimizer or the schedule, the epochs) makes the continued run a
different experiment, so a resume with such a change is refused unless the user says so
(``--resume-changed``); keys that only change how the run is executed or reported
(:data:`HARMLESS`) pass silently. A refused resume writes nothing, so the run's
``config.yaml`` stays the one its checkpoints were trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Keys (or sections, ending in ".") whose change leaves the trajectory as it was: workers,
#: the validation split, logging and checkpoint output, evaluation monitors, the device and
#: execution mode (eager or graph, memory layout, optimizer implementation: the same math).
HARMLESS = (
    "name", "data.workers", "data.val_path", "data.on_corrupt", "train.device", "train.step",
    "train.channels_last", "train.log_every", "train.max_steps", "train.on_nonfinite",
    "train.max_skipped_steps", "optim.impl", "eval.", "output.", "dist.",
)


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {self.old!r} -> {self.new!r}"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix == "data." and k == "options"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _harmless(key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS)


def config_changes(saved: dict[str, Any], current: dict[str, Any],
                   significant: tuple[str, ...] = ()) -> tuple[list[Change], list[Change]]:
    """``(trajectory_changes, harmless_changes)`` from the checkpoint's config to this run's.

    ``significant``: keys that change this kind of run although :data:`HARMLESS` covers them
    for pretraining (``eval.pretrained`` is the weights a linear evaluation trains on).
    """
    old, new = _flatten(saved), _flatten(current)
    changes = [Change(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k)]

    def harmless(key: str) -> bool:
        return _harmless(key) and key not in significant

    return [c for c in changes if not harmless(c.key)], [c for c in changes if harmless(c.key)]


def restart_batch(start_batch: int, old_global_batch: int, new_global_batch: int) -> int:
    """The batch of the new size at which the epoch continues: the first one whose samples
    were not all trained on (the epoch's order is a permutation of the samples, cut into global
    batches; a partly trained batch is trained again, never skipped)."""
    return start_batch * old_global_batch // new_global_batch
