"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path): audio files, fixed-batch
training, CLI error lines, and tiny random upstream models and checkpoints in every supported layout.

The fairseq writer renames HF keys with its own inverse table (written from fairseq's module layout, independent of
``upstreams.fairseq_convert.KEY_MAP``), so a wrong entry in the converter's table cannot cancel itself out.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from pathlib import Path

import numpy as np
import soundfile as sf
import torch


def write_noise_wav(path: Path, seconds: float = 1.0, seed: int = 0, gain: float = 0.05) -> None:
    """A 16 kHz mono wav of seeded white noise, standing in for speech in real-corpus layout trees."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (gain * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)


def train_on_fixed_batch(objective, wavs, lengths, steps: int, lr: float) -> tuple[dict, dict]:
    """Adam on one batch for ``steps`` updates: the objective's stats before and after, each computed under the same
    seed (so the same masks, negatives and noise), without gradients and without disturbing the torch RNG."""

    def evaluate() -> dict:
        state = torch.get_rng_state()
        torch.manual_seed(123)
        with torch.no_grad():
            stats = objective(wavs, lengths).stats
        torch.set_rng_state(state)
        return stats

    objective.train()
    before = evaluate()
    optimizer = torch.optim.Adam(objective.parameters(), lr=lr)
    for _ in range(steps):
        out = objective(wavs, lengths)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return before, evaluate()


def error_line(stderr: str) -> str:
    """The one ``bench: error: ...`` line of a failed command's stderr (logs may precede it; no traceback)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("bench: error: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    return errors[0]


# --------------------------------------------------------------------------------------------------------------
# Tiny upstream models and checkpoints
# --------------------------------------------------------------------------------------------------------------

TINY_HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16,) * 7,
               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
CONV_LAYERS = "[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16,2,2)] * 2"
# data2vec-audio: num_conv_pos_embeddings counts its stacked positional conv layers, of conv_pos_kernel_size each
TINY_DATA2VEC = dict(TINY_HF, num_conv_pos_embeddings=3, conv_pos_kernel_size=5)
TINY_WAVLM = dict(TINY_HF, num_buckets=16, max_bucket_distance=40)  # few buckets: short inputs reach the log ones


def jitter(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter so that, e.g., two swapped LayerNorms (init 1/0) would change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_hf_model(family: str = "hubert", large: bool = False, seed: int = 0):
    """A 2-layer, 32-d wav2vec2/HuBERT/WavLM/data2vec-audio; ``large``: layer-norm feature extractor + pre-LN
    ("stable") encoder (data2vec-audio has a layer-norm extractor and a post-LN encoder whatever ``large`` says)."""
    import transformers

    torch.manual_seed(seed)
    name = {"hubert": "Hubert", "wav2vec2": "Wav2Vec2", "wavlm": "WavLM", "data2vec_audio": "Data2VecAudio"}[family]
    config = {"wavlm": TINY_WAVLM, "data2vec_audio": TINY_DATA2VEC}.get(family, TINY_HF)
    if large and family != "data2vec_audio":
        config = dict(config, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    model = getattr(transformers, f"{name}Model")(getattr(transformers, f"{name}Config")(**config))
    return jitter(model.eval(), seed)


def hf_to_fairseq_key(key: str, layer_norm_extractor: bool) -> str | None:
    """fairseq's name for an HF wav2vec2/HuBERT key (None: no fairseq counterpart)."""
    rules = [
        (r"encoder\.pos_conv_embed\.layers\.(\d+)\.conv\.(\w+)", r"encoder.pos_conv.\1.0.\2"),  # data2vec
        (r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_linear\.(\w+)",
         r"encoder.layers.\1.self_attn.grep_linear.\2"),
        (r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_const", r"encoder.layers.\1.self_attn.grep_a"),
        (r"encoder\.layers\.(\d+)\.attention\.rel_attn_embed\.weight",
         r"encoder.layers.\1.self_attn.relative_attention_bias.weight"),
        (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(\w+)", r"feature_extractor.conv_layers.\1.0.\2"),
        (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(\w+)",
         r"feature_extractor.conv_layers.\1.2.1.\2" if layer_norm_extractor else
         r"feature_extractor.conv_layers.\1.2.\2"),
        (r"feature_projection\.layer_norm\.(\w+)", r"layer_norm.\1"),
        (r"feature_projection\.projection\.(\w+)", r"post_extract_proj.\1"),
        (r"encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
        (r"encoder\.pos_conv_embed\.conv\.(?:parametrizations\.weight\.original0|weight_g)",
         "encoder.pos_conv.0.weight_g"),
        (r"encoder\.pos_conv_embed\.conv\.(?:parametrizations\.weight\.original1|weight_v)",
         "encoder.pos_conv.0.weight_v"),
        (r"encoder\.layer_norm\.(\w+)", r"encoder.layer_norm.\1"),
        (r"encoder\.layers\.(\d+)\.attention\.(\w+)_proj\.(\w+)", r"encoder.layers.\1.self_attn.\2_proj.\3"),
        (r"encoder\.layers\.(\d+)\.layer_norm\.(\w+)", r"encoder.layers.\1.self_attn_layer_norm.\2"),
        (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(\w+)", r"encoder.layers.\1.fc1.\2"),
        (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(\w+)", r"encoder.layers.\1.fc2.\2"),
        (r"encoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", r"encoder.layers.\1.final_layer_norm.\2"),
        (r"masked_spec_embed", "mask_emb"),
    ]
    for pattern, template in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(template)
    return None


def _uses_layer_norm_extractor(model) -> bool:
    return getattr(model.config, "feat_extract_norm", "layer") == "layer"  # data2vec-audio: always


def fairseq_model_cfg(model, family: str) -> dict:
    """The model config fairseq (or unilm's WavLM) saves for ``model``."""
    c = model.config
    cfg = {"_name": family, "extractor_mode": "layer_norm" if _uses_layer_norm_extractor(model) else "default",
           "encoder_layers": c.num_hidden_layers, "encoder_embed_dim": c.hidden_size,
           "encoder_ffn_embed_dim": c.intermediate_size, "encoder_attention_heads": c.num_attention_heads,
           "activation_fn": "gelu", "layer_norm_first": getattr(c, "do_stable_layer_norm", False),
           "conv_feature_layers": CONV_LAYERS, "conv_bias": c.conv_bias, "conv_pos": c.num_conv_pos_embeddings,
           "conv_pos_groups": c.num_conv_pos_embedding_groups, "dropout": 0.1, "mask_prob": 0.65,
           "feature_grad_mult": 0.1, "final_dim": 8}
    if family == "data2vec_audio":  # fairseq: pos_conv_depth layers of kernel conv_pos // pos_conv_depth
        cfg.update(conv_pos=c.conv_pos_kernel_size * c.num_conv_pos_embeddings + 1,
                   pos_conv_depth=c.num_conv_pos_embeddings, ema_decay=0.999, average_top_k_layers=2)
    if family == "wavlm":  # unilm's WavLMConfig: flat, no model name
        del cfg["_name"]
        cfg.update(relative_position_embedding=True, num_buckets=c.num_buckets, max_distance=c.max_bucket_distance,
                   gru_rel_pos=True, mask_channel_prob=0.0)
    return cfg


def fairseq_state(model, family: str) -> dict:
    layer_norm = _uses_layer_norm_extractor(model)
    state = {}
    for k, v in model.state_dict().items():
        name = hf_to_fairseq_key(k, layer_norm)
        assert name is not None, k
        state[name] = v.clone()
    # pre-training heads that are not part of the upstream
    state["final_proj.weight"] = torch.randn(8, model.config.hidden_size)
    if family == "hubert":
        state["label_embs_concat"] = torch.randn(5, 8)
    elif family == "data2vec_audio":  # fairseq saves the EMA teacher's parameters as a dict under "_ema"
        state["_ema"] = {"encoder.layers.0.fc1.weight": torch.randn(4, 4)}
    elif family == "wavlm":  # unilm's WavLM has no pre-training head beyond mask_emb
        del state["final_proj.weight"]
    else:
        state["quantizer.vars"] = torch.randn(1, 4, 8)
        state["project_q.weight"] = torch.randn(8, 8)
    return state


def install_fake_fairseq_dictionary(monkeypatch) -> type:
    """A class importable as ``fairseq.data.dictionary.Dictionary`` (to pickle what HuBERT's task_state holds)."""
    class Dictionary:
        def __init__(self):
            self.symbols = ["<s>", "<pad>", "</s>", "<unk>", "0", "1"]
            self.count = [1] * 6
            self.indices = {s: i for i, s in enumerate(self.symbols)}

    Dictionary.__module__, Dictionary.__qualname__ = "fairseq.data.dictionary", "Dictionary"
    fairseq, data, dictionary = (types.ModuleType(n) for n in ("fairseq", "fairseq.data", "fairseq.data.dictionary"))
    dictionary.Dictionary = Dictionary
    for name, module in (("fairseq", fairseq), ("fairseq.data", data), ("fairseq.data.dictionary", dictionary)):
        monkeypatch.setitem(sys.modules, name, module)
    return Dictionary


def write_fairseq_checkpoint(path: Path, model, family: str, normalize: bool, style: str = "cfg",
                             dictionary_cls: type | None = None) -> Path:
    """A fairseq-shaped checkpoint of ``model``: ``style`` "cfg" (hydra era), "args" (Namespace), "s3prl"
    (s3prl's converted layout), "finetuned" (``w2v_encoder.w2v_model.`` prefix, config in ``w2v_args``) or "unilm"
    (WavLM's original release: ``{"cfg": flat model config with normalize, "model": state}``)."""
    model_cfg, state = fairseq_model_cfg(model, family), fairseq_state(model, family)
    task_cfg = {"_name": f"{family}_pretraining" if family == "hubert" else "audio_pretraining",
                "normalize": normalize, "sample_rate": 16000, "data": "/data/manifests"}
    if style == "unilm":
        payload = {"cfg": {**model_cfg, "normalize": normalize}, "model": state}
    elif style == "cfg":
        payload = {"args": None, "cfg": {"model": model_cfg, "task": task_cfg, "common": {"seed": 1}},
                   "model": state, "optimizer_history": [{"criterion_name": "Wav2vecCriterion", "num_updates": 10,
                                                          "lr_scheduler_state": {"best": None}}],
                   "extra_state": {"metrics": {}, "val_loss": np.float64(3.25), "train_iterator": {"epoch": 2}}}
        if dictionary_cls is not None:
            payload["task_state"] = {"dictionaries": [dictionary_cls()]}
    elif style == "args":
        flat = {**{k: v for k, v in model_cfg.items() if k != "_name"}, **task_cfg, "arch": family}
        payload = {"args": argparse.Namespace(**flat), "model": state}
    elif style == "s3prl":
        payload = {"task_cfg": task_cfg, "model_cfg": model_cfg, "model_weight": state}
        if family == "hubert":
            payload["dictionaries_symbols"] = [["<s>", "0", "1"]]
    elif style == "finetuned":
        ft_state = {f"w2v_encoder.w2v_model.{k}": v for k, v in state.items()}
        ft_state["w2v_encoder.proj.weight"] = torch.randn(30, model.config.hidden_size)
        payload = {"cfg": {"model": {"_name": f"{'hubert' if family == 'hubert' else 'wav2vec'}_ctc",
                                     "w2v_args": {"model": model_cfg, "task": task_cfg}},
                           "task": {"_name": "audio_finetuning", "normalize": normalize}}, "model": ft_state}
    else:
        raise ValueError(style)
    torch.save(payload, path)
    return path


def tiny_apc(seed: int = 0):
    from speechbench.upstreams.apc import APC, APCConfig

    torch.manual_seed(seed)
    return jitter(APC(APCConfig(hidden_size=32, num_layers=3)).eval(), seed)


def tiny_cpc(seed: int = 0):
    from speechbench.upstreams.cpc import CPCConfig, CPCModel

    torch.manual_seed(seed)
    return jitter(CPCModel(CPCConfig(hidden_encoder=32, hidden_gar=32, n_levels_gru=2)).eval(), seed)


def speechlike(num_samples: int, seed: int) -> torch.Tensor:
    from speechbench.benchmark.check_upstream import probe_signal

    return probe_signal(num_samples, seed)


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    wavs = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wavs[i, :n] = speechlike(n, seed + i)
    return wavs, torch.tensor(lengths)


def write_wav(path: Path, seconds: float, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, speechlike(round(16000 * seconds), seed).numpy(), 16000)
    return path


# --------------------------------------------------------------------------------------------------------------
# Result folders with per-item scores (leaderboard, compare, report)
# --------------------------------------------------------------------------------------------------------------

TASK_METRICS = {"ks": ("accuracy", True), "sid": ("accuracy", True), "ic": ("accuracy", True),
                "er": ("accuracy", True), "asr": ("wer", False), "pr": ("per", False), "asv": ("eer", False)}


def write_run(root: Path, upstream: str, task: str, items: list[dict], *, fold: int | None = None, seed: int = 0,
              layer_weights: list[float] | None = None, cost: dict | None = None, corpus: str = "synth",
              profile: str | None = "small", value: float | None = None, **fields) -> Path:
    """A run folder ``root/<upstream>/<task>/<run id>/`` with a schema-2 ``result.json`` and its ``items.jsonl``;
    the value is recomputed from the items (accuracy, corpus error rate or EER) unless given. Returns the result
    path."""
    import json

    from speechbench.downstreams.metrics import equal_error_rate_percent

    metric, higher = TASK_METRICS[task]
    if value is None:
        if "correct" in items[0]:
            value = 100.0 * sum(i["correct"] for i in items) / len(items)
        elif "edits" in items[0]:
            value = 100.0 * sum(i["edits"] for i in items) / sum(i["ref_len"] for i in items)
        else:
            value = equal_error_rate_percent([i["label"] for i in items], [i["score"] for i in items])
    run_dir = root / upstream / task / f"synth-{task}{f'-fold{fold}' if fold else ''}-lr0.001-seed{seed}-0000abcd"
    run_dir.mkdir(parents=True)
    result = {
        "schema_version": 2, "upstream": {"name": upstream, "checkpoint_sha256": None, "num_layers": 3},
        "task": task, "recipe": {"name": f"synth/{task}", "config_sha256": "ab12"},
        "data": {"corpus": corpus, "profile": profile}, "split": "test", "fold": fold, "metric": metric,
        "value": value, "unit": "%", "higher_is_better": higher, "learning_rate": 1e-3, "seed": seed,
        "selected": True, "layer_weights": layer_weights or [0.2, 0.3, 0.5], "layer": None, "best_step": 10,
        "timestamp": "2026-11-22T04:00:00+00:00", "run_id": run_dir.name, "items": {"file": "items.jsonl"},
        "cost": cost, **fields,
    }
    (run_dir / "result.json").write_text(json.dumps(result))
    (run_dir / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return run_dir / "result.json"


def correct_records(correct, prefix: str = "utt") -> list[dict]:
    """``items.jsonl`` records of an accuracy task: ids ``<prefix>0000``..., one 0/1 outcome each."""
    return [{"id": f"{prefix}{i:04d}", "correct": int(c)} for i, c in enumerate(correct)]
