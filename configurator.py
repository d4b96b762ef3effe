"""
Config files and command-line overrides, in nanoGPT's style:

    python train.py config/train_shapes.py --batch_size=32 --compile=False --out_dir out-test

A script defines its defaults as plain module-level variables, then calls `configure(globals())`.
Each argument is either a config file (plain Python that assigns some of those variables) or an
override `--key=value` / `--key value`. Values are Python literals (`3`, `1e-3`, `'abc'`, `None`,
`(1, 2)`); anything that is not a literal is taken as a string.

Fixed warts of the original: unknown keys are errors that list the known ones; a value must have its
default's type (an int is fine for a float), except where the default is None; booleans are strict
(True/False/true/false, nothing else; a bare `--flag` is True); `--key=a=b` splits on the first `=` only.
"""

import ast
import sys

SIMPLE = (int, float, bool, str, type(None), tuple, list, dict)


def parse_value(key, raw, default):
    if isinstance(default, bool):
        if raw not in ("True", "False", "true", "false"):
            raise ValueError(f"--{key} takes True or False, not {raw!r}")
        return raw in ("True", "true")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word: a string
    if isinstance(default, str) and value is not None and not isinstance(value, str):
        value = raw  # a string key keeps what was typed: --wandb_run_name=1e-3 is "1e-3", not "0.001"
    return check_type(key, value, default)


def check_type(key, value, default):
    if default is None or value is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # out_dir = 123 in a config file -> "123"; a list or a bool is refused below
    if type(value) is not type(default):
        raise TypeError(f"{key} must be a {type(default).__name__} like its default {default!r}, got {value!r}")
    return value


def configure(config: dict, argv=None, exit_on_error=None):
    """Apply config files and overrides from argv (default sys.argv[1:]) to `config`, in place. A bad key or value
    raises KeyError, TypeError or ValueError; with exit_on_error (default: when argv is the command line's) it
    is one `error:` line and exit status 2 instead."""
    if exit_on_error is None:
        exit_on_error = argv is None
    try:
        return apply(config, sys.argv[1:] if argv is None else list(argv))
    except (KeyError, TypeError, ValueError, OSError) as e:
        if not exit_on_error:
            raise
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        sys.exit(2)


def check(config, at_least=None, at_most=None, choices=None, may_be_none=()):
    """Refuse settings out of range before anything runs, one `error:` line naming the key and what it allows:
    at_least / at_most {key: bound} (inclusive), choices {key: allowed values}; None only for `may_be_none`."""
    for bounds, word, out in ((at_least or {}, ">=", lambda v, b: v < b), (at_most or {}, "<=", lambda v, b: v > b)):
        for key, bound in bounds.items():
            v = config[key]
            if v is None and key in may_be_none:
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or out(v, bound):
                none = " (or None)" if key in may_be_none else ""
                print(f"error: {key}={v!r}: must be a number {word} {bound}{none}", file=sys.stderr)
                sys.exit(2)
    for key, allowed in (choices or {}).items():
        if config[key] not in allowed:
            print(f"error: {key}={config[key]!r}: must be one of {', '.join(map(repr, allowed))}", file=sys.stderr)
            sys.exit(2)


def apply(config, argv):
    known = {k for k, v in config.items() if not k.startswith("_") and isinstance(v, SIMPLE)}

    def known_key(key):
        if key not in known:
            raise KeyError(f"unknown config key {key!r}; known keys: {', '.join(sorted(known))}")
        return key

    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):  # a config file
            print(f"Overriding config with {arg}:")
            with open(arg) as f:
                source = f.read()
            print(source)
            values = {}
            exec(compile(source, arg, "exec"), values)
            for k, v in values.items():
                if not k.startswith("_") and isinstance(v, SIMPLE):
                    known_key(k)  # first: config[k] below would raise a bare KeyError
                    config[k] = check_type(k, v, config[k])
            i += 1
            continue
        key, eq, raw = arg[2:].partition("=")  # the first "=" only
        if not eq and isinstance(config.get(key), bool) and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
            eq, raw = "=", "True"  # --flag
        if not eq:  # --key value
            if i + 1 >= len(argv):
                raise ValueError(f"{arg} has no value")
            raw = argv[i + 1]
            i += 1
        key = known_key(key)
        config[key] = parse_value(key, raw, config[key])
        print(f"Overriding: {key} = {config[key]!r}")
        i += 1
    return {k: config[k] for k in sorted(known)}  # the resolved config, to print and to store
