"""Command-line overrides of a flat script's settings (its module globals, each with a comment), as nanoGPT does it:
`configure(globals(), ...)` applies a preset, config files (assignments), then `--key=value` flags; see `--help`."""
import ast
import difflib
import os
import re
import symtable
import sys


# Other Wan trainers' names (musubi-tuner, diffusers' examples) of a setting nanoWM spells its own way: said, not taken
ELSEWHERE = dict(max_train_steps='max_iters', max_train_epochs='epochs', output_dir='out_dir', report_to='log_with',
                 resume_from_checkpoint='init_from=resume', network_weights='init_lora', network_dim='lora_rank',
                 rank='lora_rank', network_alpha='lora_alpha', checkpointing_steps='ckpt_interval',
                 save_every_n_steps='ckpt_interval', checkpoints_total_limit='keep_last', save_last_n_steps='keep_last',
                 validation_steps='eval_interval', train_batch_size='batch_size', mixed_precision='dtype',
                 gradient_accumulation_steps='global_batch_size: batch_size x processes x accumulation',
                 lr_warmup_steps='warmup_iters', max_grad_norm='grad_clip', dit='pretrained', lora_weight='lora',
                 lora_multiplier='lora_scale')


def configure(config, argv=None, presets=None, gpu_preset=None, choices=None, positive=(), nonnegative=(),
              fractions=()):
    """Set the globals `config` from the command line, check them; the settings a flag or config file gave."""
    pairs, args = [], list(sys.argv[1:] if argv is None else argv)
    known = sorted((k for k, v in config.items() if not k.startswith('_') and not k.isupper()   # the preset first
                    and isinstance(v, (int, float, bool, str, type(None), tuple, list))), key=lambda k: k != 'preset')
    if '--help' in args or '-h' in args:
        _print_help(config, known, presets, gpu_preset)
        raise SystemExit(0)
    while args:   # pairs: (key, text) of each flag, (None, path) of each config file, all checked before any applies
        arg = args.pop(0)
        key, sep, text = arg[2:].partition('=') if arg.startswith('--') else (None, None, arg)   # None: a config file
        if key is None and not os.path.isfile(arg):
            raise SystemExit(f"{arg}: no such config file (settings are given as --key=value)")
        elif key is not None and key not in known:
            ours = ELSEWHERE.get(key, '')   # another tool's name of a setting this script lacks: no look-alike
            near = [] if ours else difflib.get_close_matches(key, known, n=1)
            hint = (f"another Wan tool's name (musubi-tuner, diffusers); nanoWM's is --{ours}"
                    if re.split('[=:]', ours)[0] in known
                    else f"did you mean --{near[0]}?" if near else f"known settings: {', '.join(sorted(known))}")
            raise SystemExit(f"unknown setting --{key}; {hint} (--help describes them)")
        elif key is not None and not sep:   # `--key value`; a bare boolean `--flag` is True (`--flag False` also works)
            bare = isinstance(config[key], bool) and args[:1] not in (['True'], ['False'])
            if not bare and (not args or args[0].startswith('--') and not args[0][2:3].isdecimal()):
                raise SystemExit(f"--{key} needs a value, e.g. --{key}={config[key]!r} or --{key} {config[key]!r}")
            text = 'True' if bare else args.pop(0)
        pairs.append((key, text))
    if presets:   # before any flag: --preset, else under torchrun on CUDA GPUs gpu_preset, else the script's preset
        named = [text for key, text in pairs if key == 'preset']
        torchrun = 'LOCAL_RANK' in os.environ and 'WORLD_SIZE' in os.environ   # set in every process torchrun starts
        gpus = not named and gpu_preset and torchrun and _cuda_available()   # nobody runs the CPU demo on 32 GPUs
        name = named[-1] if named else gpu_preset if gpus else config['preset']
        how = 'torchrun without CUDA GPUs' if torchrun else 'a plain `python` run'
        why = ('given by --preset' if named else 'launched by torchrun on CUDA GPUs (--preset=cpu for the demo)' if gpus
               else f"the default of {how} (--preset={gpu_preset} for the paper's)" if gpu_preset else 'the default')
        if name not in presets:
            raise SystemExit(f"--preset={name!r} is not one of {', '.join(map(repr, presets))}")
        config.update(presets[name], preset=name)
        print(f"preset {name}: {why}")
    given = {key for key, _ in pairs} - {None, 'preset'}
    for key, text in pairs:
        if key is None:   # a config file: the names it assigns (not its functions' or comprehensions' locals)
            code = open(text).read()
            print(f"config file {text}:\n{code}")
            try:
                table = symtable.symtable(code, text, 'exec')
            except SyntaxError as e:
                raise SystemExit(f"{text}, line {e.lineno}: {e.msg} (a config file holds Python assignments)") from None
            assigned = {s.get_name() for s in table.get_symbols() if s.is_assigned() and not s.is_namespace()}
            if 'preset' in assigned and 'preset' in known:
                raise SystemExit(f"{text} sets preset: give it as --preset=NAME (a preset applies before config files)")
            for name in sorted(n for n in assigned - set(known) if not n.startswith('_')):
                near = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {near[0]}?" if near else "--help lists the settings"
                raise SystemExit(f"{text}: {name} is not a setting; {hint} (helper names start with _)")
            before = {k: config[k] for k in assigned & set(known)}
            exec(compile(code, text, 'exec'), config)
            config.update({k: _typed(config[k], old, f"{text}: {k} = {config[k]!r}") for k, old in before.items()})
            given |= set(before)
        elif key != 'preset':
            try:   # a string setting takes the text as typed: --shards=0,1 is '0,1'
                value = text if isinstance(config[key], str) else ast.literal_eval(text)
            except (SyntaxError, ValueError):
                value = text   # a word: _typed names it
            config[key] = _typed(value, config[key], f"--{key}={text}")
            print(f"override: {key} = {config[key]!r}")
    rules = [(k, abs(config[k]) < float('inf'), 'is not a finite number') for k in known if type(config[k]) is float]
    rules += [(k, config[k] in a, f"is not one of {', '.join(map(repr, a))}") for k, a in (choices or {}).items()]
    rules += [(k, config[k] > 0, 'must be positive') for k in positive]
    rules += [(k, config[k] >= 0, 'must be >= 0') for k in nonnegative]
    for key, ok, rule in rules + [(k, 0 <= config[k] <= 1, 'must lie in [0, 1]') for k in fractions]:
        if not ok:
            raise SystemExit(f"--{key}={config[key]!r} {rule}")
    return given


def _cuda_available():
    return __import__('torch').cuda.is_available()   # torch imported only when torchrun asks


def _typed(value, old, given_as):
    """value in the type of the default old (3 for a float: 3.0, for a list: [3]; a bool is no int), or stop."""
    if isinstance(old, (list, tuple)):
        return type(old)(value if isinstance(value, (list, tuple)) else [value])
    if old is not None and (isinstance(value, bool) != isinstance(old, bool)
                            or not isinstance(value, (float, int) if isinstance(old, float) else type(old))):
        expected = 'bool (True or False)' if isinstance(old, bool) else type(old).__name__
        raise SystemExit(f"{given_as} has type {type(value).__name__}, expected {expected} (default {old!r})")
    return float(value) if isinstance(old, float) else value


def _print_help(config, known, presets, gpu_preset):
    """The usage, docstring, presets, then each setting with its default and comment under its `# -- title --`."""
    path = config.get('__file__', '')
    print(f"usage: python {os.path.basename(path or sys.argv[0])} [config.py] [--key=value | --key value ...]",
          *(config.get('__doc__') or '').strip().splitlines()[:1], sep='\n\n', end='\n\n')   # docstring line 1
    if presets:
        rule = f"; torchrun on CUDA GPUs: {gpu_preset}" if gpu_preset else ''
        print(f"presets (--preset=NAME; default: {config['preset']}{rule}; later flags override them):")
        print(*(f"  {name}: " + (' '.join(f"{k}={v!r}" for k, v in overrides.items()) or '(the defaults below)')
                for name, overrides in presets.items()), sep='\n', end='\n\n')
    text = open(path).read() + '\n' if os.path.isfile(path) else ''
    notes = {m[1]: ' '.join([m[2].strip()] + [line.strip()[1:].strip() for line in m[3].splitlines()])   # the first
             for m in reversed(list(re.finditer(r'^\s*([A-Za-z_]\w*)\s*=[^=\n].*?#\s?(.*)\n((?:[ \t]+#(?! ---).*\n)*)',
                                                text, re.M)))}   # assignment's: a setting's, not a later derivation's
    parts = re.split(r'^# -- (\S.*?) --[ \t]*$', text, flags=re.M)   # untitled, title, its text, title, its text...
    sections = {name: title for title, part in reversed(list(zip([None] + parts[1::2], parts[0::2])))   # the first wins
                for name in re.findall(r'^([A-Za-z_]\w*)\s*=[^=]', part, re.M)}
    print("settings (default, then what it is):")
    for title in sorted(dict.fromkeys(sections.get(k) for k in known), key=bool):   # untitled first, then in order
        if title:
            print(f"\n{title}:")
        for key in (k for k in known if sections.get(k) == title):
            print(f"  --{key:<{max(map(len, known))}}  {config[key]!r:<12}  {notes.get(key, '')}".rstrip())
