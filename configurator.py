"""Command-line overrides for the flat scripts, as nanoGPT does it.

A script keeps its settings as plain module globals, each with a one-line comment, and calls,
right after defining them,

    from configurator import configure
    configure(globals(), presets=PRESETS, choices=..., positive=..., fractions=...)

Then `python train_compression.py --batch_size=8` (or `--batch_size 8`) overrides those globals:
  - the values are parsed with ast.literal_eval; a setting whose default is a string takes the
    text as it is (`--shards=0,1`, `--data_dir=/data/1x`); a boolean flag alone means True;
  - an unknown key, a value of the wrong type, a value outside a setting's `choices`, a count
    that must be positive, or a probability outside [0, 1] stops the script with a message that
    names the flag and says what is allowed;
  - a bare argument (`python train_compression.py my_run.py`) is a Python file of assignments,
    held to the same rules (a name that is no setting must start with _; the preset is a flag);
  - an unknown key gets the nearest setting suggested ("did you mean --learning_rate?");
  - `--help` / `-h` prints every setting with its default and its comment, then exits. A comment
    line `# -- data --` above a block of settings makes them a section of the help (settings above
    the first such line come first, without a title).

Presets. A preset is a dict of overrides applied before the flags, so any flag wins over it. The
script's own `preset` default names the one used by a plain `python script.py`; a script launched
by torchrun on CUDA GPUs uses `gpu_preset` instead (the paper's recipe: nobody launches 32 GPUs
to run a CPU demo); an explicit `--preset` always wins. The first line printed says which preset
was chosen and why.
"""
import ast
import difflib
import os
import re
import sys

SETTING_TYPES = (int, float, bool, str, type(None), tuple, list)


def launched_by_torchrun():
    """torchrun (torch.distributed.run) sets these for every process it starts."""
    return 'LOCAL_RANK' in os.environ and 'WORLD_SIZE' in os.environ


SECTION = re.compile(r'^# -- (\S.*?) --\s*$')   # `# -- data --`: the settings below it, in --help


def _comments(path):
    """What --help says of the script's settings, read from its source in one pass:
    notes, setting name -> its comment (`name = value  # comment`, with the comment lines right
    below it that continue it); sections, setting name -> the title of the `# -- data --` marker
    above its first assignment (later lines of the script may reassign it)."""
    notes, sections, last, title = {}, {}, None, None
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return notes, sections
    for line in lines:
        marker = SECTION.match(line)
        if marker:
            title, last = marker.group(1), None
            continue
        top = re.match(r'^([A-Za-z_]\w*)\s*=[^=]', line)
        if top and title:
            sections.setdefault(top.group(1), title)
        m = re.match(r'^\s*([A-Za-z_]\w*)\s*=[^=].*?#\s?(.*)$', line)
        if m:
            last = m.group(1)
            notes[last] = m.group(2).strip()
        elif last and re.match(r'^\s+#', line) and not line.strip().startswith('# ---'):
            notes[last] += ' ' + line.strip()[1:].strip()
        else:
            last = None
    return notes, sections


def _print_help(config, known, presets, gpu_preset):
    script = os.path.basename(config.get('__file__', sys.argv[0]))
    notes, sections = _comments(config.get('__file__', ''))
    doc = (config.get('__doc__') or '').strip().splitlines()
    print(f"usage: python {script} [config.py] [--key=value | --key value ...]\n")
    if doc:
        print(doc[0] + '\n')
    if presets:
        default = config.get('preset')
        rule = f"; torchrun on CUDA GPUs: {gpu_preset}" if gpu_preset else ''
        print(f"presets (--preset=NAME; default: {default}{rule}; later flags override them):")
        for name, overrides in presets.items():
            print(f"  {name}: " + (' '.join(f"{k}={v!r}" for k, v in overrides.items()) or '(the defaults below)'))
        print()
    print("settings (default, then what it is):")
    width = max(len(k) for k in known)
    groups = {}   # title -> settings, in the order of the script; None: those above the first marker
    for key in known:
        groups.setdefault(sections.get(key), []).append(key)
    for title, keys in sorted(groups.items(), key=lambda item: item[0] is not None):   # stable: script order
        if title is not None:
            print(f"\n{title}:")
        for key in keys:
            default = repr(config[key])
            note = f"  {notes[key]}" if key in notes else ''
            print(f"  --{key:<{width}}  {default:<{max(12, len(default))}}" + note)


def _parse_args(argv, known, config):
    """[(key, text)] from --key=value, --key value and a bare --flag; a config file is (None, path)."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise SystemExit(f"{arg}: no such config file (settings are given as --key=value)")
            pairs.append((None, arg))
            continue
        key, sep, value = arg[2:].partition('=')
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean --{near[0]}?" if near else f"known settings: {', '.join(sorted(known))}"
            raise SystemExit(f"unknown setting --{key}; {hint} (--help describes them)")
        if not sep:
            nxt = argv[i] if i < len(argv) else None
            if isinstance(config[key], bool):   # `--flag` alone is True; `--flag False` also works
                if nxt in ('True', 'False'):
                    value, i = nxt, i + 1
                else:
                    value = 'True'
            elif nxt is None or (nxt.startswith('--') and not re.match(r'^--?\d', nxt)):
                raise SystemExit(f"--{key} needs a value, e.g. --{key}={config[key]!r} or --{key} {config[key]!r}")
            else:
                value, i = nxt, i + 1
        pairs.append((key, value))
    return pairs


def _convert(key, text, old):
    if isinstance(old, str):
        return text   # strings are taken as typed: --shards=0,1 stays '0,1'
    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
        value = text
    return _typed(value, old, f"--{key}={text}")


def _typed(value, old, given_as):
    """value if it has the type of the default old (an int for a float setting becomes a float, one
    value for a list setting a list of one), else stop naming how it was given."""
    if isinstance(old, (list, tuple)):
        return type(old)(value if isinstance(value, (list, tuple)) else [value])
    ok = old is None or isinstance(value, type(old)) or (isinstance(old, float) and isinstance(value, int)
                                                        and not isinstance(value, bool))
    if isinstance(old, int) and not isinstance(old, bool) and isinstance(value, bool):
        ok = False
    if not ok:
        expected = 'bool (True or False)' if isinstance(old, bool) else type(old).__name__
        raise SystemExit(f"{given_as} has type {type(value).__name__}, expected {expected} (default {old!r})")
    return float(value) if isinstance(old, float) else value


def _assigned_names(tree):
    """The names a file's top level assigns (loops, ifs and with-statements included); not the
    locals of its functions, lambdas and comprehensions, which never reach the script."""
    names, todo = set(), [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.ListComp,
                             ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        todo.extend(ast.iter_child_nodes(node))
    return names


def _run_config_file(path, config, known):
    """Execute a config file of assignments into config; the names it assigns. Each must be a
    setting of the script (a helper name starts with _), of the setting's type; not the preset,
    which applies before any file."""
    with open(path) as f:
        code = f.read()
    print(f"config file {path}:\n{code}")
    assigned = _assigned_names(ast.parse(code, path))
    if 'preset' in assigned and 'preset' in known:
        raise SystemExit(f"{path} sets preset: give it as --preset=NAME (a preset applies before config files)")
    for name in sorted(assigned - set(known)):
        if not name.startswith('_'):
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {near[0]}?" if near else "--help lists the settings"
            raise SystemExit(f"{path}: {name} is not a setting; {hint} (a helper name in a config file starts with _)")
    settings = assigned & set(known)
    before = {k: config[k] for k in settings}
    exec(code, config)
    for k in settings:
        config[k] = _typed(config[k], before[k], f"{path}: {k} = {config[k]!r}")
    return settings


def check(config, choices=None, positive=(), nonnegative=(), fractions=()):
    """Stop with a message naming the flag if a setting is outside what it allows."""
    for key, allowed in (choices or {}).items():
        if config[key] not in allowed:
            raise SystemExit(f"--{key}={config[key]!r} is not one of {', '.join(map(repr, allowed))}")
    for key in positive:
        if not config[key] > 0:
            raise SystemExit(f"--{key}={config[key]!r} must be positive")
    for key in nonnegative:
        if not config[key] >= 0:
            raise SystemExit(f"--{key}={config[key]!r} must be >= 0")
    for key in fractions:
        if not 0 <= config[key] <= 1:
            raise SystemExit(f"--{key}={config[key]!r} must lie in [0, 1]")


def configure(config, argv=None, presets=None, gpu_preset=None, choices=None, positive=(), nonnegative=(),
              fractions=()):
    """Apply a preset, then config files and flags, to the globals dict `config`; then check them.

    presets: name -> dict of overrides (the script's `preset` global names the default one).
    gpu_preset: the preset used when torchrun launches the script on CUDA GPUs and no --preset is
    given. choices: setting -> allowed values. positive / nonnegative / fractions: settings that
    must be > 0 / >= 0 / in [0, 1]. Returns the names of the settings the user gave (by a flag or
    a config file; a preset's are not given): a resume refuses those that differ from its checkpoint."""
    argv = sys.argv[1:] if argv is None else argv
    known = [k for k, v in config.items() if not k.startswith('_') and not k.isupper()
             and isinstance(v, SETTING_TYPES)]
    if presets:   # listed first in --help
        known.insert(0, known.pop(known.index('preset')))
    if '--help' in argv or '-h' in argv:
        _print_help(config, known, presets, gpu_preset)
        raise SystemExit(0)
    pairs = _parse_args(argv, known, config)
    if presets:
        given = [v for k, v in pairs if k == 'preset']
        if given:
            name, why = given[-1], 'given by --preset'
        elif gpu_preset and launched_by_torchrun() and _cuda_available():
            name, why = gpu_preset, 'launched by torchrun on CUDA GPUs (--preset=cpu for the demo)'
        else:
            how = 'torchrun without CUDA GPUs' if launched_by_torchrun() else 'a plain `python` run'
            name, why = config['preset'], (f"the default of {how} (--preset={gpu_preset} for the paper's)"
                                           if gpu_preset else 'the default')
        if name not in presets:
            raise SystemExit(f"--preset={name!r} is not one of {', '.join(map(repr, presets))}")
        config['preset'] = name
        config.update(presets[name])
        print(f"preset {name}: {why}")
    given = set()
    for key, text in pairs:
        if key is None:   # a config file: plain Python assignments, in order with the flags
            given |= _run_config_file(text, config, known)
            continue
        if key == 'preset':
            continue
        config[key] = _convert(key, text, config[key])
        given.add(key)
        print(f"override: {key} = {config[key]!r}")
    check(config, choices, positive, nonnegative, fractions)
    return given


def _cuda_available():
    import torch
    return torch.cuda.is_available()
