"""Training configs: every field documented and on the CLI, encoder defaults, refusals, presets."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from model.config import CommonConfig, ConfigError, add_config_flags, build_config, flag_of, given_values
from model.modes import MODES, get_mode
from model.modes.distill import DistillConfig
from model.modes.jpq import JpqConfig
from model.modes.poeem import PoeemConfig
from model.presets import PRESETS, preset_values
from model.train import resolve_config
from service.cli import parser

CONFIGS = [DistillConfig, JpqConfig, PoeemConfig]
TRAIN = ["train", "--data", "d", "--out", "o"]


def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _train_flags() -> set[str]:
    return {s for a in _train_parser()._actions for s in a.option_strings}


def test_registry_holds_the_three_modes_with_their_configs():
    assert set(MODES) == {"distill", "jpq", "poeem"}
    for name, mode in MODES.items():
        assert mode.name == name and mode.config.mode == name and mode.summary
        assert get_mode(name) is mode


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.mode)
def test_every_field_has_a_why_and_a_flag_in_train_help(cls):
    flags = _train_flags()
    for f in fields(cls):
        assert isinstance(f.metadata.get("why"), str) and f.metadata["why"].strip(), f.name
        assert flag_of(f) in flags, f"{cls.mode}.{f.name}: {flag_of(f)} missing from `jointpq train`"
        if f.type in (bool, "bool", "bool | None"):
            assert "--no-" + flag_of(f)[2:] in flags, f.name


def test_every_field_flag_appears_in_help_text():
    text = _train_parser().format_help()
    for cls in CONFIGS:
        for f in fields(cls):
            assert flag_of(f) in text, f.name


def test_common_fields_flags_use_their_names():
    by_name = {f.name: f for f in fields(CommonConfig)}
    assert flag_of(by_name["M"]) == "--m"
    assert flag_of(by_name["val_fraction"]) == "--val-fraction"
    assert flag_of(by_name["kmeans_iters"]) == "--kmeans-iters"


@pytest.mark.parametrize(
    ("mode", "encoder", "expected"),
    [
        ("jpq", "minilm", {"lr": 5e-6}),
        ("jpq", "minilm-head", {"lr": 1e-3}),
        ("poeem", "hashed", {"lr": 5e-3, "shared_towers": True, "warmup_steps": 40}),
        ("poeem", "minilm-head", {"lr": 1e-3, "shared_towers": False, "warmup_steps": 30}),
        ("poeem", "minilm", {"lr": 5e-6, "shared_towers": False}),
        ("distill", "minilm", {"lr": 1e-3}),
    ],
)
def test_by_encoder_defaults(mode, encoder, expected):
    cfg = resolve_config(mode, encoder=encoder)
    assert cfg.encoder == encoder
    for name, value in expected.items():
        assert getattr(cfg, name) == value, name


def test_mode_default_encoders_and_lr():
    assert resolve_config("distill").encoder == "minilm"
    assert resolve_config("jpq").encoder == "minilm"
    poeem = resolve_config("poeem")
    assert poeem.encoder == "minilm-head" and poeem.lr == 1e-3 and poeem.shared_towers is False


def test_unresolved_config_keeps_none_and_resolve_fills_a_copy():
    cfg = PoeemConfig(encoder="hashed")
    out = cfg.resolve()
    assert cfg.lr is None and cfg.shared_towers is None
    assert out is not cfg and out.lr == 5e-3 and out.shared_towers is True


def test_explicit_value_beats_the_by_encoder_default():
    cfg = resolve_config("poeem", encoder="hashed", lr=0.1, shared_towers=False, warmup_steps=0)
    assert cfg.lr == 0.1 and cfg.shared_towers is False and cfg.warmup_steps == 0
    assert resolve_config("jpq", given={"lr": 2e-5}).lr == 2e-5


def test_mode_defaults_differ_where_declared():
    assert resolve_config("distill").epochs == 30 and resolve_config("distill").patience == 8
    assert resolve_config("jpq").epochs == 3 and resolve_config("jpq").batch_size == 32
    assert resolve_config("poeem").epochs == 10 and resolve_config("poeem").batch_size == 64


@pytest.mark.parametrize(
    ("mode", "values", "pattern"),
    [
        ("distill", {"encoder": "hashed"}, r"--mode distill cannot use --encoder hashed: .*untrained"),
        ("distill", {"encoder": "minilm-head"}, r"--mode distill cannot use --encoder minilm-head"),
        ("jpq", {"encoder": "hashed"}, r"--mode jpq cannot use --encoder hashed: .*--mode poeem"),
        ("poeem", {"encoder": "hashed", "distill_weight": 1.0}, r"--distill-weight needs --encoder minilm-head"),
        ("poeem", {"encoder": "minilm", "distill_weight": 0.5}, r"--distill-weight needs --encoder minilm-head"),
        ("poeem", {"distill_weight": -1.0}, r"--distill-weight must be >= 0"),
        ("jpq", {"distill_weight": -1.0}, r"--distill-weight must be >= 0"),
        ("poeem", {"encoder": "bert"}, r"--encoder 'bert' is not one of"),
        ("poeem", {"nbits": 6}, r"--nbits 6 is not one of \(4, 8\)"),
        ("jpq", {"metric": "cos"}, r"--metric 'cos' is not one of"),
        ("distill", {"loss": "mse"}, r"--loss 'mse' is not one of \('listnet', 'margin-mse'\)"),
        ("poeem", {"val_fraction": 0.0}, r"--val-fraction must be in \(0, 1\), got 0.0"),
        ("poeem", {"val_fraction": 1.0}, r"--val-fraction must be in \(0, 1\)"),
        ("jpq", {"val_fraction": 1.5}, r"--val-fraction must be in \(0, 1\)"),
        ("poeem", {"M": 0}, r"--m must be >= 1, got 0"),
        ("distill", {"nlist": 0}, r"--nlist must be >= 1"),
        ("jpq", {"batch_size": 0}, r"--batch-size must be >= 1"),
        ("poeem", {"lr": 0.0}, r"--lr must be > 0"),
        ("poeem", {"patience": 0}, r"--patience >= 1"),
        ("poeem", {"canary_margin": 1.5}, r"--canary-margin must be in \(0, 1\]"),
    ],
)
def test_refusals_name_the_flag(mode, values, pattern):
    with pytest.raises(ConfigError, match=pattern):
        resolve_config(mode, **values)


def test_distill_positive_fields_are_refused():
    with pytest.raises(ValueError, match=r"--top-k must be > 0"):
        resolve_config("distill", top_k=0)
    with pytest.raises(ValueError, match=r"--codebook-lr must be > 0"):
        resolve_config("distill", codebook_lr=-1e-3)


def test_poeem_distill_weight_with_minilm_head_is_accepted():
    assert resolve_config("poeem", encoder="minilm-head", distill_weight=1.0).distill_weight == 1.0


def test_get_mode_unknown_lists_every_valid_mode():
    with pytest.raises(ConfigError) as e:
        get_mode("nope")
    msg = str(e.value)
    assert "'nope'" in msg
    for name in ("auto", "distill", "jpq", "poeem"):
        assert name in msg
    with pytest.raises(ConfigError, match="nope"):
        resolve_config("nope")


def test_user_flag_the_mode_lacks_is_refused():
    with pytest.raises(ConfigError, match=r"--codebook-lr does not apply to --mode poeem"):
        resolve_config("poeem", given={"codebook_lr": 1e-3})
    with pytest.raises(ConfigError, match=r"--min-queries, --top-k does not apply to --mode jpq"):
        resolve_config("jpq", given={"top_k": 5, "min_queries": 10})
    with pytest.raises(ConfigError, match=r"--shared-towers does not apply to --mode distill"):
        resolve_config("distill", shared_towers=True)


def test_preset_value_the_mode_lacks_is_dropped():
    assert "min_queries" in PRESETS["smoke"].values
    cfg = resolve_config("poeem", preset="smoke")
    assert not hasattr(cfg, "min_queries") and "min_queries" not in cfg.to_dict()
    assert (cfg.M, cfg.nlist, cfg.epochs, cfg.warmup_steps, cfg.batch_size, cfg.val_min) == (8, 16, 2, 5, 32, 10)
    jpq = resolve_config("jpq", preset="smoke")
    assert (jpq.M, jpq.nlist, jpq.epochs, jpq.batch_size) == (8, 16, 2, 32)
    distill = resolve_config("distill", preset="smoke")
    assert (distill.min_queries, distill.top_k, distill.random_items) == (200, 50, 64)


def test_user_values_beat_the_preset():
    cfg = resolve_config("poeem", preset="smoke", given={"M": 4, "epochs": 7})
    assert cfg.M == 4 and cfg.epochs == 7 and cfg.nlist == 16


def test_build_config_without_given_refuses_every_foreign_field():
    with pytest.raises(ConfigError, match=r"--codebook-lr does not apply to --mode poeem"):
        build_config(PoeemConfig, {"codebook_lr": 1e-3})
    assert build_config(PoeemConfig, {"codebook_lr": 1e-3, "M": 4}, given={"M"}).M == 4


def test_presets():
    assert preset_values(None) == {}
    assert preset_values("scifact") == {"nlist": 64}
    values = preset_values("demo")
    values["M"] = 99
    assert PRESETS["demo"].values["M"] == 16  # a copy
    for name, preset in PRESETS.items():
        assert preset.why, name
        for mode in MODES:
            resolve_config(mode, preset=name)  # every preset works with every mode


def test_unknown_preset_is_refused():
    with pytest.raises(ConfigError, match=r"--preset 'huge' is not one of demo, trainer-image, scifact, smoke"):
        resolve_config("poeem", preset="huge")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_to_dict_has_mode_and_every_field(mode):
    cfg = resolve_config(mode)
    d = cfg.to_dict()
    assert d["mode"] == mode
    names = {f.name for f in fields(cfg)}
    assert set(d) == names | {"mode"}
    for name in names:
        assert d[name] == getattr(cfg, name)


def test_val_nprobe_is_a_quarter_of_the_cells():
    assert resolve_config("poeem", nlist=64).val_nprobe == 16
    assert resolve_config("poeem", nlist=3).val_nprobe == 1


def test_cli_flags_parse_to_field_values_and_unset_stay_none():
    args = parser().parse_args([*TRAIN, "--m", "8", "--no-rotation", "--distill-weight", "1"])
    assert args.M == 8 and isinstance(args.M, int)
    assert args.rotation is False
    assert args.distill_weight == 1.0 and isinstance(args.distill_weight, float)
    assert args.mode == "auto"
    for name in ("nlist", "lr", "epochs", "guard", "encoder", "shared_towers", "codebook_lr", "seed"):
        assert getattr(args, name) is None, name
    classes = [m.config for m in MODES.values()]
    assert given_values(args, classes) == {"M": 8, "rotation": False, "distill_weight": 1.0}


def test_cli_bool_flags_and_choices():
    args = parser().parse_args([*TRAIN, "--guard", "--no-shared-towers", "--lr", "1e-4", "--mode", "jpq"])
    assert args.guard is True and args.shared_towers is False and args.lr == 1e-4 and args.mode == "jpq"
    with pytest.raises(SystemExit):
        parser().parse_args([*TRAIN, "--nbits", "6"])
    with pytest.raises(SystemExit):
        parser().parse_args([*TRAIN, "--mode", "nope"])


def test_cli_given_values_resolve_for_poeem():
    args = parser().parse_args([*TRAIN, "--m", "8", "--no-rotation", "--encoder", "hashed"])
    given = given_values(args, [m.config for m in MODES.values()])
    cfg = resolve_config("poeem", given=given)
    assert cfg.M == 8 and cfg.rotation is False and cfg.encoder == "hashed" and cfg.lr == 5e-3


def test_add_config_flags_marks_mode_specific_flags():
    p = argparse.ArgumentParser()
    add_config_flags(p, CONFIGS)
    helps = {a.dest: a.help for a in p._actions}
    assert helps["codebook_lr"].endswith("[distill, jpq]")
    assert "[poeem]" in helps["shared_towers"]
    assert "[" not in helps["seed"]  # every mode has it
    assert "by encoder" in helps["lr"]
