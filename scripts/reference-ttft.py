#!/usr/bin/env python3
"""Times the Python reference (OpenGVLab/InternVL `InternVLChatModel.chat`, transformers 4.47.1, CPU)
on the workload of /work/shared/BENCH.md, so internvl-chat's figures can be compared in the same minutes.

Run with the interpreter of the venv that scripts/reference-setup.sh makes:
    ~/.cache/internvl-peers/reference/venv/bin/python scripts/reference-ttft.py [--runs 3]

Per run and shape it prints one JSON line: time to first token (from the image path to the first
generated token, the model card's preprocessing included, through `model.chat` with max_new_tokens=1)
and, for 1 tile, greedy decode tokens/s over 64 forced new tokens (min_new_tokens=64): the 63 tokens
after the first over the time between the first and the last. Then medians.
peak_rss_gib is the process's peak so far (getrusage ru_maxrss), so it grows with the largest shape run.
The prompt length the reference builds and the number of tiles are checked against BENCH.md's
(311 / 1847 tokens, 1 / 7 tiles) when the default image and question are used.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

REFERENCE = os.environ.get('REFERENCE', os.path.expanduser('~/.cache/internvl-peers/reference'))
# transformers copies the remote code into its modules cache; keep it beside the staging folder.
os.environ.setdefault('HF_MODULES_CACHE', os.path.join(REFERENCE, 'hf-modules'))
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

DEFAULT_IMAGE = '/work/shared/fixtures/media/images/image1.jpg'
DEFAULT_QUESTION = '<image>\nPlease describe the image in detail.'
# BENCH.md's shapes: max_num -> (tiles, prompt tokens)
EXPECTED = {1: (1, 311), 6: (7, 1847)}
INPUT_SIZE = 448
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- the model card's load_image, written here ------------------------------------------------
def card_transform(input_size=INPUT_SIZE):
    return T.Compose([
        T.Lambda(lambda im: im if im.mode == 'RGB' else im.convert('RGB')),
        T.Resize((input_size, input_size), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def tile_grid(width, height, min_num, max_num, size):
    """The (columns, rows) grid the card picks: the closest aspect ratio among the grids with
    min_num..max_num tiles; on a tie the later candidate wins when the image's area exceeds half the
    grid's pixel area. Candidates come in the card's order: a set of grids sorted (stably) by count."""
    grids = {(c, r) for n in range(min_num, max_num + 1) for c in range(1, n + 1) for r in range(1, n + 1)
             if min_num <= c * r <= max_num}
    grids = sorted(grids, key=lambda g: g[0] * g[1])
    aspect = width / height
    best, best_diff = (1, 1), float('inf')
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and width * height > 0.5 * size * size * c * r:
            best = (c, r)
    return best


def split_tiles(image, min_num=1, max_num=12, size=INPUT_SIZE, use_thumbnail=True):
    cols, rows = tile_grid(image.width, image.height, min_num, max_num, size)
    resized = image.resize((size * cols, size * rows))
    tiles = [resized.crop(((k % cols) * size, (k // cols) * size, (k % cols + 1) * size, (k // cols + 1) * size))
             for k in range(cols * rows)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    return tiles


def load_image(path, max_num, transform):
    image = Image.open(path).convert('RGB')
    return torch.stack([transform(t) for t in split_tiles(image, max_num=max_num)]).to(torch.bfloat16)


# --- timing helpers ----------------------------------------------------------------------------
class TokenClock(BaseStreamer):
    """Timestamps every generated token; generate()'s first put() is the prompt (empty here, since
    the reference generates from inputs_embeds) and is skipped."""

    def __init__(self):
        self.seen_prompt = False
        self.times = []

    def put(self, value):
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        now = time.perf_counter()
        self.times.extend([now] * value.reshape(-1).numel())

    def end(self):
        pass


def accept_safetensors_without_metadata():
    """The BENCH.md checkpoint is written by the project's random_checkpoint example, whose safetensors
    header has no __metadata__; transformers 4.47.1 calls .get() on that None and fails. Reading a missing
    metadata as {'format': 'pt'} (what later transformers releases do) changes nothing else: the
    tensors are read by safetensors as before. The checkpoint itself stays untouched."""
    import transformers.modeling_utils as mu

    class Handle:
        def __init__(self, inner):
            self._inner = inner

        def __enter__(self):
            self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def metadata(self):
            meta = self._inner.metadata()
            return {'format': 'pt'} if meta is None else meta

        def __getattr__(self, name):
            return getattr(self._inner, name)

    real = mu.safe_open
    mu.safe_open = lambda *a, **kw: Handle(real(*a, **kw))


def check_tiles_against_golden(image_path, max_nums):
    """Our load_image must give the model card's tiles: compare each Pillow tile's bytes with the
    fixtures' golden (made with the card's own code). Returns a line saying what was checked."""
    import hashlib
    fixtures = os.environ.get('INTERNVL_FIXTURES', '/work/shared/fixtures')
    golden_path = os.path.join(fixtures, 'golden', 'preprocess', os.path.basename(image_path) + '.json')
    if not os.path.isfile(golden_path):
        return f'not checked: {golden_path} does not exist'
    golden = {run['max_num']: run for run in json.load(open(golden_path))['runs']}
    image = Image.open(image_path).convert('RGB')
    for max_num in max_nums:
        if max_num not in golden:
            return f'not checked for max_num {max_num}: {golden_path} has none'
        ours = [hashlib.sha256(t.tobytes()).hexdigest() for t in split_tiles(image, max_num=max_num)]
        theirs = [t['sha256'] for t in golden[max_num]['tiles']]
        if ours != theirs:
            sys.exit(f'{golden_path}: max_num {max_num}: our tiles differ from the golden ones '
                     f'({len(ours)} vs {len(theirs)} tiles)')
    return f'tiles equal to {golden_path} for max_num {max_nums}'


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default=os.path.join(REFERENCE, 'model'),
                    help='staging folder made by scripts/reference-setup.sh')
    ap.add_argument('--image', default=DEFAULT_IMAGE)
    ap.add_argument('--question', default=DEFAULT_QUESTION)
    ap.add_argument('--max-num', type=int, nargs='+', default=[1, 6],
                    help="the card's max_num per shape (1: 1 tile, 6: 3x2 + thumbnail)")
    ap.add_argument('--runs', type=int, default=3)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--decode-tokens', type=int, default=64, help='0 skips the decode measurement')
    args = ap.parse_args()

    for path, what in ((os.path.join(args.model, 'config.json'), '--model'), (args.image, '--image')):
        if not os.path.isfile(path):
            sys.exit(f'{what}: {path} does not exist' + (' (run scripts/reference-setup.sh first)' if what == '--model' else ''))
    check = args.image == DEFAULT_IMAGE and args.question == DEFAULT_QUESTION
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()

    preprocess_check = check_tiles_against_golden(args.image, args.max_num) if check else 'not checked: not the BENCH.md image/question'
    accept_safetensors_without_metadata()
    t = time.perf_counter()
    # as the model card loads it, less .cuda()
    model = AutoModel.from_pretrained(args.model, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True,
                                      use_flash_attn=True, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True, use_fast=False)
    load_s = time.perf_counter() - t
    if type(model).__module__.split('.')[-1] != 'modeling_internvl_chat':
        sys.exit(f'loaded {type(model)}, not the reference InternVLChatModel')
    transform = card_transform()

    # chat() builds the prompt internally; record the input_ids it hands to generate().
    prompt_lens = []
    reference_generate = model.generate

    def recording_generate(*a, **kw):
        prompt_lens.append(int(kw['input_ids'].shape[-1]))
        return reference_generate(*a, **kw)

    model.generate = recording_generate

    def request(max_num, new_tokens):
        """One request: image path -> pixel values -> model.chat; returns the measurements."""
        clock = TokenClock()
        config = dict(max_new_tokens=new_tokens, do_sample=False, streamer=clock)
        if new_tokens > 1:
            config['min_new_tokens'] = new_tokens  # chat() sets eos to <|im_end|>; this forbids it
        t0 = time.perf_counter()
        pixel_values = load_image(args.image, max_num, transform)
        t_pre = time.perf_counter()
        model.chat(tokenizer, pixel_values, args.question, config)
        t_end = time.perf_counter()
        if len(clock.times) != new_tokens:
            sys.exit(f'asked for {new_tokens} new tokens, the reference generated {len(clock.times)}')
        out = dict(tiles=int(pixel_values.shape[0]), prompt_tokens=prompt_lens[-1],
                   preprocess_s=t_pre - t0, ttft_s=clock.times[0] - t0)
        if new_tokens > 1:
            out['decode_tok_s'] = (new_tokens - 1) / (clock.times[-1] - clock.times[0])
        out['total_s'] = t_end - t0
        return out

    def emit(record):
        print(json.dumps(record), flush=True)

    emit(dict(engine='reference', kind='load', load_s=round(load_s, 3), threads=torch.get_num_threads(),
              torch=torch.__version__, peak_rss_gib=round(peak_rss_gib(), 3), preprocess=preprocess_check))
    request(args.max_num[0], 2)  # warm-up: the first request pays lazy initialisation

    failures = []
    results = {}
    for run in range(args.runs):
        jobs = [('ttft', m, 1) for m in args.max_num]
        if args.decode_tokens > 0:
            jobs.append(('decode', 1, args.decode_tokens))
        for kind, max_num, new_tokens in jobs:
            r = request(max_num, new_tokens)
            if check and max_num in EXPECTED and (r['tiles'], r['prompt_tokens']) != EXPECTED[max_num]:
                failures.append(f"max_num {max_num}: {r['tiles']} tiles, {r['prompt_tokens']} prompt tokens; "
                                f"BENCH.md expects {EXPECTED[max_num][0]} tiles, {EXPECTED[max_num][1]} tokens")
            r.update(peak_rss_gib=peak_rss_gib())
            results.setdefault((kind, max_num), []).append(r)
            emit(dict(engine='reference', kind=kind, run=run, max_num=max_num,
                      **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))

    for (kind, max_num), rs in results.items():
        med = dict(engine='reference', kind=f'{kind}_median', max_num=max_num, runs=len(rs),
                   tiles=rs[0]['tiles'], prompt_tokens=rs[0]['prompt_tokens'])
        for key in ('preprocess_s', 'ttft_s', 'decode_tok_s', 'total_s'):
            if key in rs[0]:
                med[key] = round(statistics.median(r[key] for r in rs), 4)
        med['peak_rss_gib'] = round(max(r['peak_rss_gib'] for r in rs), 3)
        emit(med)
    if failures:
        sys.exit('prompt check failed: ' + '; '.join(failures))


if __name__ == '__main__':
    main()
