"""Tests for configurator.py: config files, --key=value and --key value overrides, and the fixed warts of
nanoGPT's configurator (first '=' only, strict booleans, type checks, unknown keys refused)."""

import pytest

from configurator import configure


def defaults():
    return dict(out_dir="out", batch_size=16, learning_rate=1e-4, compile=False, clip_pretrained=None,
                betas=(0.9, 0.95), _private=1, os=pytest)  # a module and a _name are not config keys


def test_no_arguments_returns_the_resolved_defaults():
    cfg = defaults()
    resolved = configure(cfg, [])
    assert resolved == {"out_dir": "out", "batch_size": 16, "learning_rate": 1e-4, "compile": False,
                        "clip_pretrained": None, "betas": (0.9, 0.95)}
    assert list(resolved) == sorted(resolved)


def test_overrides_both_forms_apply_in_place_and_in_the_result():
    cfg = defaults()
    resolved = configure(cfg, ["--batch_size=32", "--out_dir", "runs/a", "--compile", "True"])
    assert (cfg["batch_size"], cfg["out_dir"], cfg["compile"]) == (32, "runs/a", True)
    assert resolved["batch_size"] == 32 and resolved["out_dir"] == "runs/a" and resolved["compile"] is True


def test_split_on_the_first_equals_only():
    cfg = defaults()
    configure(cfg, ["--out_dir=a=b"])
    assert cfg["out_dir"] == "a=b"


def test_a_string_key_keeps_what_was_typed():
    cfg = defaults()
    configure(cfg, ["--out_dir=1e-3"])
    assert cfg["out_dir"] == "1e-3"
    configure(cfg, ["--out_dir='quoted'"])
    assert cfg["out_dir"] == "quoted"


def test_literals():
    cfg = defaults()
    configure(cfg, ["--learning_rate=3e-4", "--betas=(0.8, 0.99)", "--clip_pretrained=openai"])
    assert cfg["learning_rate"] == 3e-4 and cfg["betas"] == (0.8, 0.99) and cfg["clip_pretrained"] == "openai"


@pytest.mark.parametrize("raw,value", [("True", True), ("False", False), ("true", True), ("false", False)])
def test_strict_bools_accept(raw, value):
    cfg = defaults()
    configure(cfg, [f"--compile={raw}"])
    assert cfg["compile"] is value


@pytest.mark.parametrize("raw", ["yes", "1", "0", "Flase", "TRUE", "", "None"])
def test_strict_bools_refuse(raw):
    with pytest.raises(ValueError, match="compile"):
        configure(defaults(), [f"--compile={raw}"])


def test_a_bare_bool_flag_is_true():
    cfg = defaults()
    configure(cfg, ["--compile", "--batch_size=8"])
    assert cfg["compile"] is True and cfg["batch_size"] == 8
    cfg = defaults()
    configure(cfg, ["--batch_size=8", "--compile"])
    assert cfg["compile"] is True
    with pytest.raises(ValueError, match="has no value"):  # only booleans may stand alone
        configure(defaults(), ["--batch_size"])


def test_int_for_a_float_key_becomes_float():
    cfg = defaults()
    configure(cfg, ["--learning_rate=1"])
    assert cfg["learning_rate"] == 1.0 and type(cfg["learning_rate"]) is float


@pytest.mark.parametrize("arg", ["--batch_size=abc", "--batch_size=2.5", "--batch_size=True", "--betas=[0.9, 0.95]",
                                 "--learning_rate=True", "--learning_rate=fast"])
def test_wrong_types_raise(arg):
    with pytest.raises(TypeError):
        configure(defaults(), [arg])


def test_none_default_accepts_anything():
    for raw, value in [("3", 3), ("abc", "abc"), ("(1, 2)", (1, 2)), ("None", None), ("1.5", 1.5)]:
        cfg = defaults()
        configure(cfg, [f"--clip_pretrained={raw}"])
        assert cfg["clip_pretrained"] == value


def test_unknown_key_from_argv_lists_the_known_keys():
    with pytest.raises(KeyError) as e:
        configure(defaults(), ["--batchsize=3"])
    msg = str(e.value)
    assert "batchsize" in msg
    for k in ("batch_size", "out_dir", "learning_rate", "compile", "clip_pretrained", "betas"):
        assert k in msg
    assert "_private" not in msg and "'os'" not in msg


def test_missing_value_raises():
    with pytest.raises(ValueError, match="no value"):
        configure(defaults(), ["--batch_size=3", "--out_dir"])


def test_config_file(tmp_path):
    f = tmp_path / "conf.py"
    f.write_text("import math\nout_dir = 'from-file'\nbatch_size = 4\nlearning_rate = 1\n"
                 "_helper = math.pi\nbetas = (0.5, 0.6)\n")
    cfg = defaults()
    resolved = configure(cfg, [str(f), "--batch_size=8"])  # later arguments win
    assert (cfg["out_dir"], cfg["batch_size"], cfg["betas"]) == ("from-file", 8, (0.5, 0.6))
    assert cfg["learning_rate"] == 1.0 and type(cfg["learning_rate"]) is float
    assert resolved == {k: v for k, v in cfg.items() if k not in ("_private", "os")}


def test_config_file_unknown_key_and_bad_type(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("batch_sz = 4\n")
    with pytest.raises(KeyError, match="batch_size"):
        configure(defaults(), [str(f)])
    f.write_text("compile = 1\n")
    with pytest.raises(TypeError):
        configure(defaults(), [str(f)])
    f.write_text("batch_size = '4'\n")
    with pytest.raises(TypeError):
        configure(defaults(), [str(f)])


def test_missing_config_file():
    with pytest.raises(FileNotFoundError):
        configure(defaults(), ["no/such/config.py"])


def test_train_py_defaults_parse():
    """Every key of train.py's own config file exists in train.py (a renamed key would break it)."""
    import ast
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def assigned(path):
        tree = ast.parse(open(path).read())
        return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}
    assert assigned(os.path.join(root, "config", "train_shapes.py")) <= assigned(os.path.join(root, "train.py"))
