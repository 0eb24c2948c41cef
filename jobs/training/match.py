"""Whether a finished SAE or transcoder set is what a `saescope train` command asks for.

A finished artifact of the requested name is skipped ("already trained; nothing to
do") only when it matches the request; otherwise the command is refused with one
line listing each option that differs and saying that ``--force`` replaces it.

What is compared: the options the user gave (on the command line or in a
``--config`` file) that change the weights. An option left out, or given as
"auto", matches whatever the artifact was trained with, so re-running the command
that made it is always "already trained". Values are compared as training
resolved them where that needs no data: ``--expansion`` as the d_sae it gives,
``--tokens`` rounded down to whole batches, ``--layers`` as the list of layers.
Library callers that pass no ``given`` set compare every option they set to a
value other than "auto".
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from jobs.options import ConfigError, config_to_mapping

IGNORED = frozenset({"run", "name", "force", "device", "checkpoint_every", "lm_eval_contexts", "transcoder"})
"""Options that do not change what is trained (a resumed or re-run job may differ in them)."""


def given_options(cls: type, args) -> frozenset[str]:
    """The fields of ``cls`` set by a flag or by the --config file (argparse leaves the others out)."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {name for name in vars(args) if name in names}
    path = getattr(args, "config_file", None)
    if path:  # already read and checked by config_from_args
        with open(path, "rb") as handle:
            given |= set(tomllib.load(handle)) & names
    return frozenset(given)


def _compared(requested: dict, given: frozenset[str] | None) -> list[str]:
    keys = [key for key in requested if key not in IGNORED and requested[key] not in (None, "auto")]
    if given is None:
        return keys
    wanted = set(given) | ({"d_sae"} if "expansion" in given else set())
    return [key for key in keys if key in wanted and key != "expansion"]


def differences(requested: dict, recorded: dict, given: frozenset[str] | None) -> list[str]:
    """``--flag: trained with X, requested Y`` for each compared option whose recorded value differs."""
    lines = []
    for key in _compared(requested, given):
        before = recorded.get(key, requested[key])  # not recorded (an imported SAE): nothing to compare with
        if before != requested[key]:
            flag = "--" + key.replace("_", "-")
            lines.append(f"{flag}: trained with {_shown(before)}, requested {_shown(requested[key])}")
    return lines


def _shown(value) -> str:
    if value is None:
        return "auto"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def refuse_if_different(lines: list[str], folder: Path, what: str) -> None:
    """One ConfigError line listing ``lines`` (nothing when they are empty)."""
    if lines:
        raise ConfigError(
            f"{folder} is a finished {what} trained with other options ({'; '.join(lines)}): "
            f"pass --force to replace it, or --name to train another {what}"
        )


def sae_request(resolved_cfg, batch_size: int) -> dict:
    """The options of a member resolved without data, ``tokens`` as training rounds it (whole batches)."""
    requested = config_to_mapping(resolved_cfg)
    if requested.get("tokens") is not None:
        requested["tokens"] = max(1, requested["tokens"] // batch_size) * batch_size
    return requested


def sae_recorded(saved_cfg: dict) -> dict:
    """What a finished SAE was trained with: its training record, else (imported) its cfg.json's shape."""
    record = saved_cfg.get("saescope") if isinstance(saved_cfg.get("saescope"), dict) else {}
    training = record.get("training") if isinstance(record.get("training"), dict) else {}
    if training:
        return dict(training)
    return {key: saved_cfg[key] for key in ("d_sae", "k") if key in saved_cfg}
