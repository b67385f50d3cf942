"""Export a checkpoint in the Hugging Face GPT-2 format (and upload it).

    python hf_export.py                                   # runs/demo/final -> runs/demo/hf
    python hf_export.py --ckpt runs/v2/best --out exports/v2 --check
    python hf_export.py --push_to_hub user/mnist-image-gpt [--private]
    python hf_export.py --onnx [--quantize int8] --check   # also onnx/: the GPT, the image tokenizer, model.json
    python hf_export.py --web site && python -m http.server -d site   # the page, run in the browser (npm ci first)

The folder (default `--out`: `hf/` next to the checkpoint folder, so runs/demo/final -> runs/demo/hf)
loads with `transformers` unchanged, no custom code (AutoModelForCausalLM / AutoTokenizer); what it
holds is described in imagegpt/huggingface.py. It is built under a temporary name and renamed into place, so an
error leaves nothing half-written; an existing `--out` is replaced only if it is an earlier export.
`--push_to_hub REPO_ID` uploads it (token from HF_TOKEN or `hf auth login`). checkpoint.load() (so
eval.py, sample.py and train.py's `init_from`) reads such a folder like one of its own checkpoints.

`--onnx` adds onnx/model.onnx (the GPT with its key/value cache), onnx/tokenizer.onnx and
onnx/detokenizer.onnx (the codebook: images <-> codes) and onnx/model.json, so that the model runs with
onnxruntime alone (the client in the README); their parity with tokenizer.py goes to onnx/export.json.
`--web OUT` (implies --onnx --quantize int8) also writes a static folder OUT that any static file server
serves: the page of static/ running the graphs in the browser with onnxruntime-web (installed by `npm
ci`), with the int8 GPT where it keeps the results on the test split (--web_graph to choose).
"""
import os

from imagegpt import checkpoint, hub, huggingface, web_export
from imagegpt.cli import add_ckpt, parser, run_cli
from imagegpt.errors import UserError
from imagegpt.export_checks import check_export
from imagegpt.files import check_file, read_json
from imagegpt.provenance import write_result


def build_parser():
    p = parser(__doc__, prog="hf_export.py")
    add_ckpt(p, help="checkpoint folder to export")
    p.add_argument("--out", default=None, help="output folder (default: hf/ next to the checkpoint folder, "
                   "e.g. runs/demo/hf); replaced only if it is an earlier export")
    p.add_argument("--check", action="store_true", help="load the folder with transformers and report "
                   "logit, greedy-generation and tokenizer parity with our model")
    p.add_argument("--onnx", action="store_true", help="also write onnx/model.onnx: the decoder with its key/value "
                   "cache for onnxruntime (Hugging Face GPT-2 input and output names), onnx/tokenizer.onnx and "
                   "onnx/detokenizer.onnx (the codebook: images <-> codes) and onnx/model.json")
    p.add_argument("--quantize", choices=("int8",), default=None, help="with --onnx: also write "
                   "onnx/model_quantized.onnx, dynamically quantised by onnxruntime (int8 weights); with --web the "
                   "page runs it")
    p.add_argument("--web", metavar="OUT", default=None, help="also write a static folder OUT (implies --onnx "
                   "--quantize int8): the page, run in the browser by onnxruntime-web (run `npm ci` first); replaced "
                   "only if it is an earlier one")
    p.add_argument("--web_graph", choices=("auto", "fp32", "int8"), default="auto", help="with --web: the GPT graph "
                   "the page runs; auto: int8 where it keeps the test split's results, else fp32")
    p.add_argument("--json", metavar="FILE", default=None, help="with --check: also write what it found (parity with "
                   "transformers, with the ONNX graphs and of the image tokenizer) to this JSON file")
    p.add_argument("--push_to_hub", metavar="REPO_ID", default=None,
                   help="upload the folder to this Hugging Face model repository (token: HF_TOKEN or login)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    return p


def parse(argv):
    """The command line -> parsed args, every combination checked before any work."""
    args = build_parser().parse_args(argv)
    if args.private and not args.push_to_hub:
        raise UserError("--private only applies together with --push_to_hub")
    if args.json and not args.check:
        raise UserError("--json only applies together with --check (it writes what the check found)")
    if args.json:
        check_file(args.json, "JSON file")
    if args.web_graph != "auto" and not args.web:
        raise UserError("--web_graph only applies together with --web")
    args.onnx = args.onnx or bool(args.web)
    args.quantize = args.quantize or ("int8" if args.web else None)   # the page may run the int8 graph
    if args.quantize and not args.onnx:
        raise UserError("--quantize only applies together with --onnx or --web")
    return args


def main(argv=None):
    args = parse(argv)
    if args.web:                                      # before the export work: node_modules and the folder
        web_export.ort_dist()
        web_export.check_site_out(os.path.abspath(args.web))
    token = None
    if args.push_to_hub:
        hub.check_repo_id(args.push_to_hub)   # fail on a bad id or a missing token before the export work
        token = hub.hub_token()
    out = os.path.abspath(args.out or huggingface.default_out(args.ckpt))
    huggingface.check_out(out)
    ck = checkpoint.load(args.ckpt)
    huggingface.write_export(ck, out, repo_id=args.push_to_hub, onnx=args.quantize or ("fp32" if args.onnx else None))
    print(f"wrote {out} ({len(os.listdir(out))} files) from {ck.folder}")
    if args.onnx:
        show_onnx(out)
    if args.web:
        write_site(args, ck, out)
    if args.check and not check(args, ck, out):
        return 1
    if args.push_to_hub:
        hub.push_to_hub(out, args.push_to_hub, args.private, token=token)
    return 0


def show_onnx(out):
    """Print the ONNX graphs' sizes and the image tokenizer's parity with tokenizer.py."""
    sizes = {f: os.path.getsize(os.path.join(out, "onnx", f)) for f in os.listdir(os.path.join(out, "onnx"))
             if f.endswith(".onnx")}
    print("onnx: " + ", ".join(f"onnx/{f} {n / 2 ** 20:.1f} MB" for f, n in sorted(sizes.items())))
    t = read_json(os.path.join(out, "onnx", "export.json"))["tokenizer"]["parity"]
    print(f"tokenizer parity on {t['data']}: {t['codes_differing']} of {t['codes']} codes differ from "
          f"tokenizer.py; decoded pixels within {t['max_abs_pixel_diff']:.2g} (every code: "
          f"{t['max_abs_pixel_diff_all_codes']:.2g})")


def write_site(args, ck, out):
    """--web: the static page, with the GPT graph chosen (web_export.choose_graph) or given (--web_graph)."""
    choice = web_export.choose_graph(ck, out) if args.web_graph == "auto" else \
        {"graph": "model_quantized.onnx" if args.web_graph == "int8" else "model.onnx", "why": "--web_graph " + args.web_graph}
    print(f"the page runs onnx/{choice['graph']}: {choice['why']}")
    files = web_export.write_site(out, args.web, int8=choice["graph"] == "model_quantized.onnx", choice=choice)
    print(f"wrote {os.path.abspath(args.web)} ({len(files)} files, {sum(files.values()) / 2 ** 20:.1f} MB): serve it "
          f"with python -m http.server -d {args.web}")


def check(args, ck, out):
    """--check: the export against the checkpoint (imagegpt/export_checks.py); prints what it found, writes
    it with --json -> whether it passed."""
    backends = ("onnx", "onnx-int8")[:2 if args.quantize else 1] if args.onnx else ()
    try:
        found = check_export(ck, out, backends, tokenizer=args.onnx)
    except ImportError:
        raise UserError("--check needs transformers (pip install transformers)") from None
    r = found["transformers"]
    print(f"parity: max |logit diff| {r['max_abs_logit_diff']:.3g} (fp32), greedy generate "
          f"{'identical' if r['greedy_equal'] else 'DIFFERENT'} over {r['greedy_tokens']} tokens, tokenizer "
          f"{'identical' if r['tokenizer_equal'] else 'DIFFERENT'}"
          f"{', load problems ' + str(r['load_problems']) if r['load_problems'] else ''}")
    for backend in backends:
        o = found[backend]
        print(f"{backend} parity: max |logit diff| {o['max_abs_logit_diff']:.3g} full, "
              f"{o['max_abs_cached_diff']:.3g} step by step through the cache; greedy "
              f"{'identical' if o['greedy_equal'] else 'different'} over {o['greedy_tokens']} tokens")
    if args.json:
        seed = ck.settings.get("seed")
        write_result(args.json, found, config=args, dtype="fp32", seeds=[seed] if isinstance(seed, int) else None)
        print(f"wrote {args.json}")
    return found["passed"]


if __name__ == "__main__":
    run_cli(main)
