"""experiments.hyena_vs_gpt: both models get the same settings; the record; bad inputs."""

from __future__ import annotations

import json

import pytest

from experiments import hyena_vs_gpt


def test_pair_trains_both_with_the_same_settings(tmp_path, monkeypatch):
  # train_lm.train itself is tested in test_train_lm (hyena and GPT presets); here: both
  # runs get identical settings, and the record / JSON / table carry their summaries.
  seen = []

  def fake_train(cfg, log=print):
    seen.append(cfg)
    model_cfg = cfg.model_config()  # the preset with the overrides applied must be valid
    assert model_cfg.max_seq_len == cfg.seq_len
    hy = cfg.preset.startswith("hyena")
    return dict(params=100 if hy else 90, tokens_per_s=3000.0 if hy else 2000.0, mfu=None,
                compile_s=1.0, first_train_loss=5.0, final_train_loss=4.0 if hy else 3.5,
                val_loss=1.5, val_ppl=4.5 if hy else 3.0, wall_s=2.0, device="cpu")

  monkeypatch.setattr(hyena_vs_gpt.train_lm, "train", fake_train)
  record = hyena_vs_gpt.run_pair(hyena="hyena-tiny", gpt="tiny", seq_len=48, batch_size=8,
                                 lr=3e-3, steps=7, eval_batches=1, out=tmp_path,
                                 log=lambda *_: None)
  assert [c.preset for c in seen] == ["hyena-tiny", "tiny"]
  shared = ("steps", "seq_len", "batch_size", "lr", "seed", "eval_batches", "warmup_steps")
  assert [getattr(seen[0], f) for f in shared] == [getattr(seen[1], f) for f in shared]
  assert seen[0].seq_len == 48 and seen[0].steps == 7 and seen[0].eval_every == 7
  assert seen[0].out != seen[1].out
  assert [r["model"] for r in record["rows"]] == ["hyena", "gpt"]
  assert record["rows"][0]["val_ppl"] == 4.5 and record["rows"][1]["tokens_per_s"] == 2000.0
  assert json.loads((tmp_path / "hyena_vs_gpt.json").read_text()) == record
  table = hyena_vs_gpt.format_table(record)
  assert "hyena / gpt: tokens/s 1.50x, val ppl 1.500x" in table


def test_bad_pairs_raise(tmp_path):
  with pytest.raises(ValueError, match="hyena must name a hyena-\\* preset, got 'tiny'"):
    hyena_vs_gpt.run_pair(hyena="tiny", gpt="tiny", seq_len=32, batch_size=4, lr=1e-3,
                          steps=1, out=tmp_path)
  with pytest.raises(ValueError, match="gpt must name a GPT preset, got 'hyena-tiny'"):
    hyena_vs_gpt.run_pair(hyena="hyena-tiny", gpt="hyena-tiny", seq_len=32, batch_size=4,
                          lr=1e-3, steps=1, out=tmp_path)
  with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
    hyena_vs_gpt.run_pair(hyena="hyena-tiny", gpt="tiny", seq_len=32, batch_size=4,
                          lr=1e-3, steps=0, out=tmp_path)
