"""Lay out the files the demo's guard reads: its policy, the coverage reference and a key ring.

The policy (``extauthz/demo/policy.yaml``) names its coverage reference relative to itself, so the
three files are written side by side into the work directory: ``policy.yaml``,
``coverage-reference.npy`` (the digits' inputs projected as the coverage detector projects them,
the "normal traffic" it compares clients with) and ``keys.yaml`` (a fresh watermark and noise key
per run; the red team reads it to verify its clones).
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extauthz.demo.model import load_data
from extauthz.detect.pipeline import detection_projector

__all__ = ["DEMO_POLICY", "DemoFiles", "prepare", "write_coverage_reference"]

DEMO_POLICY = Path(__file__).with_name("policy.yaml")


@dataclass(frozen=True, slots=True)
class DemoFiles:
    """Where :func:`prepare` put the guard's files."""

    policy: Path
    keys_file: Path
    noise_key_file: Path

    @property
    def guard_args(self) -> list[str]:
        """Return the ``extauthz serve`` flags that load the keys."""
        return ["--keys-file", str(self.keys_file), "--noise-key-file", str(self.noise_key_file)]


def write_coverage_reference(path: Path, *, seed: int = 0) -> Path:
    """Save the digits' inputs, projected as the detectors project them, as normal traffic."""
    x_train, x_test, _, _ = load_data(seed)
    natural = np.vstack([x_train, x_test]).astype(np.float32)
    np.save(path, detection_projector().project(natural))
    return path


def prepare(workdir: Path, *, seed: int = 0) -> DemoFiles:
    """Write the demo policy, its coverage reference and a new key ring into ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    policy = workdir / "policy.yaml"
    shutil.copyfile(DEMO_POLICY, policy)
    write_coverage_reference(workdir / "coverage-reference.npy", seed=seed)
    keys_file = workdir / "keys.yaml"
    keys_file.write_text(f"current: demo1\nkeys: {{demo1: {secrets.token_hex(32)}}}\n")
    keys_file.chmod(0o600)
    noise_key_file = workdir / "noise.key"
    noise_key_file.write_text(secrets.token_hex(32) + "\n")
    noise_key_file.chmod(0o600)
    return DemoFiles(policy=policy, keys_file=keys_file, noise_key_file=noise_key_file)
