"""Calibration of q for sampling: the scale recovers a known miscalibration exactly, the drafter applies
it (greedy drafts unchanged), `diffdraft calibrate` writes it, and DFlash export keeps it."""

from __future__ import annotations

import json

import pytest
import torch

from diffdraft.backends import build_target
from diffdraft.cli import main
from diffdraft.config import SamplingConfig
from diffdraft.drafters import build_drafter
from diffdraft.drafters.block_diffusion import recorded_signature, save_drafter
from diffdraft.drafters.dflash import export_dflash, load_dflash
from diffdraft.train.calibrate import SCALES, acceptance_by_scale, expected_accepted
from test_dflash import MASK, TAPS, G, dflash_net, drafts


class _FullHead:
    def to_full(self, probs):
        return probs


class _Fake:
    head = _FullHead()


def test_expected_accepted_by_hand():
    alpha = torch.tensor([[1.0, 0.5, 0.5], [0.0, 1.0, 1.0]])
    assert expected_accepted(alpha).tolist() == [1.0 + 0.5 + 0.25, 0.0]


@pytest.mark.parametrize("sharpness", [0.5, 2.0])
def test_the_scale_undoes_a_known_miscalibration(sharpness):
    """A drafter whose logits are the target's times c has q = p exactly at scale c: acceptance 1 per slot."""
    target_logits = torch.randn(20, G - 1, 50, generator=torch.Generator().manual_seed(0)) * 3
    curve = acceptance_by_scale(_Fake(), target_logits * sharpness, target_logits)
    assert max(curve, key=curve.get) == pytest.approx(sharpness)
    assert curve[max(curve, key=curve.get)] == pytest.approx(G - 1, abs=1e-4)
    assert min(curve.values()) < G - 1.5  # the wrong scales lose acceptance: the check can fail


@pytest.fixture
def target(tiny_model, tiny_tokenizer):
    return build_target(tiny_model, tiny_tokenizer, tap_layers=TAPS, name="tiny")


def test_the_drafter_applies_its_scale(target, tmp_path):
    folder = tmp_path / "d"
    save_drafter(folder, dflash_net(target), TAPS, recorded_signature(target))
    plain = build_drafter(str(folder), target)
    config = json.loads((folder / "drafter.json").read_text())
    (folder / "drafter.json").write_text(json.dumps({**config, "q_scale": 2.0}))
    scaled = build_drafter(str(folder), target)
    assert scaled.q_scale == 2.0
    tokens = list(range(40, 60))
    raw = drafts(plain, target, tokens, SamplingConfig(temperature=1.0), 0).probs
    soft = drafts(scaled, target, tokens, SamplingConfig(temperature=1.0), 0).probs
    assert torch.allclose(soft, torch.softmax(torch.log(raw) / 2.0, dim=-1), atol=1e-5)
    greedy = SamplingConfig()
    assert torch.equal(drafts(plain, target, tokens, greedy, 0).tokens, drafts(scaled, target, tokens, greedy, 0).tokens)
    out = tmp_path / "dflash"
    export_dflash(folder, out, dtype="float32")
    assert load_dflash(out)[3] == 2.0
    assert torch.equal(drafts(build_drafter(str(out), target), target, tokens, SamplingConfig(temperature=1.0), 3).probs,
                       drafts(scaled, target, tokens, SamplingConfig(temperature=1.0), 3).probs)


def test_calibrate_command_writes_the_scale(target, tiny_model_dir, tmp_path, capsys):
    from diffdraft.train.data import Sequence, write_shard

    folder = tmp_path / "d"
    save_drafter(folder, dflash_net(target), TAPS, recorded_signature(target))
    gen = torch.Generator().manual_seed(5)
    seqs = [Sequence(torch.randint(0, 250, (30,), generator=gen).tolist(), 6) for _ in range(4)]
    write_shard(tmp_path / "eval-00000.safetensors", seqs)
    assert main(["calibrate", str(folder), "--data", str(tmp_path), "--model", tiny_model_dir, "--sequences", "4"]) == 0
    out = capsys.readouterr().out
    config = json.loads((folder / "drafter.json").read_text())
    assert config["q_scale"] in SCALES and len(config["q_scale_curve"]) == len(SCALES)
    assert f"q scale {config['q_scale']:.3f} written" in out and "<- best" in out
    assert build_drafter(str(folder), target).q_scale == config["q_scale"]
