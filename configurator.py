"""Command-line overrides for the flat training scripts, as nanoGPT does it.

A script keeps its settings as plain module globals and calls, right after defining them,

    from configurator import configure
    configure(globals())

Then `python train_compression.py --batch_size=8 --preset=paper` overrides those globals.
A bare argument (`python train_compression.py config/my_run.py`) is a Python file of
assignments that runs first. `--key=value` is parsed with ast.literal_eval (strings may be
given bare); an unknown key or a value of the wrong type is an error that says what to do.
"""
import ast
import sys


def configure(config, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    known = {k for k, v in config.items()
             if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None), tuple, list))}
    for arg in argv:
        if not arg.startswith('--'):
            with open(arg) as f:  # a config file: plain Python assignments
                code = f.read()
            print(f"config file {arg}:\n{code}")
            exec(code, config)
            continue
        key, sep, value = arg[2:].partition('=')
        if key not in known:
            raise SystemExit(f"unknown config key --{key}; known keys: {', '.join(sorted(known))}")
        if not sep:  # `--flag` alone sets a boolean to True
            if not isinstance(config[key], bool):
                raise SystemExit(f"--{key} needs a value, e.g. --{key}={config[key]!r}")
            value = 'True'
        try:
            value = ast.literal_eval(value)
        except (SyntaxError, ValueError):
            pass  # a bare string, e.g. --data_dir=/data/1x
        old = config[key]
        if old is not None and not isinstance(value, type(old)) and not (isinstance(old, float) and isinstance(value, int)):
            raise SystemExit(f"--{key}={value!r} has type {type(value).__name__}, expected {type(old).__name__} "
                             f"(default {old!r})")
        config[key] = float(value) if isinstance(old, float) else value
        print(f"override: {key} = {config[key]!r}")
