"""Benchmarks, each side by side with what users would otherwise pick, in one run on one machine.

    python bench.py --threads 1 --json bench.json   # everything (CPU: about 15 minutes)
    python bench.py --quick              # fewer repetitions, 100,000 k-means vectors
    python bench.py --only train,kmeans  # a subset: train, sample, sample_demo, kmeans
    python bench.py --preset gpu         # the GPU table of docs/performance.md on a CUDA GPU -> gpu_bench.json
    python bench.py --only web --web_ckpt runs/demo/final   # the page in Chromium: in the browser vs serve.py

What is measured (ours vs peer, identical sizes and batch, same weights where it applies):
  train    one training step (forward, loss, backward, AdamW step) of our GPT vs transformers'
           GPT2LMHeadModel built from the same GPT2Config our export writes (gelu_new, dropout 0,
           the attention implementation transformers picks by default, reported), loaded with our
           weights so both compute the same loss; AdamW with the same two groups and settings as
           train.py (ours: model.configure_optimizers; theirs: torch.optim.AdamW). Batch 16, at
           sequence length 512 and at the default one (the default tokenisation gives 54-token
           sequences: 53 input tokens). Tokens/s = batch * length / step time. Each side runs in
           fp32 and, where the device has bf16 kernels, under bf16 autocast; the up to four sides
           alternate in one loop, and three comparisons are reported:
             defaults  what a user gets: ours as train.py runs it (--bf16 auto: bf16 autocast where
                       supported) vs theirs as transformers runs it unless told otherwise (fp32);
             fp32      both fp32;   bf16   both under bf16 autocast.
  mfu      the FLOP/s our training step's kernels compute over the matmul ceiling measured in the same
           run and dtype: the best rate of a large square product (sampled between the training steps)
           and of each of the step's own matrix products run alone (the forward and both backward
           products of every linear layer, in autograd's layouts; MatmulPeak). No product of the step
           runs faster alone than that ceiling, so the MFU stays <= 100 % on any CPU (on an AVX2 EPYC the
           square alone was slower than the model's shapes, and the old square-only peak gave 118 %).
           FLOPs per token, the PaLM / nanoGPT convention:
               6 * N + 12 * n_layer * T * n_embd
           N = the weights of the matmuls (12 * n_embd^2 per layer, plus vocab * n_embd for the
           tied output layer; embeddings lookups, biases and LayerNorms are not counted); 12*L*T*d
           counts the attention scores and the weighted values (forward 4*T*d per layer, backward
           twice that) over the full T x T square. A causal kernel computes about half of that
           square: 6 * N + 6 * n_layer * T * n_embd. The MFU counts what our kernels compute: the full
           square where model.causal_attention runs explicit matmuls (CPU, T <= SHORT_ATTENTION), the
           causal half where it runs the flash kernel; nanoGPT's full-square figure is reported beside it.
  sample   greedy sampling through our KV cache (decoding.generate) vs transformers' generate() on
           the model exported by hf_export and loaded with AutoModelForCausalLM; batch 1 and 16,
           prompt "<IMG>", the same number of new tokens on both sides (EOS disabled on both, so
           neither stops early); the generated tokens are compared; images/s (one image per row).
           Ours computes as sample.py does by default (--bf16 auto for decoding: bf16 autocast on a
           bf16 GPU, and on a bf16 CPU for models at least 256 wide; fp32 otherwise), theirs in fp32
           (transformers' default); ours in the other precision is reported beside it. The ONNX graphs of the same export (onnx/model.onnx
           fp32 and onnx/model_quantized.onnx int8 weights) run through our decoding loop in
           onnxruntime (CPU only). Classification (at each sampling batch size): class
           probabilities of random prefixes '<IMG> codes </IMG> <CLS>' (52 tokens) through
           metrics.class_probs, ours and onnxruntime, vs one forward of the HF model read at <CLS>.
           "sample" runs the model of --n_layer/--n_head/--n_embd/--block_size (v2 by default),
           "sample_demo" the demo model (config/demo.yaml's sizes).
  kmeans   our tokenizer.kmeans vs scikit-learn KMeans(n_clusters=500, init="k-means++", n_init=1)
           on the same 300,000 feature vectors: the per-pixel features (patch_size 1) of the
           built-in training digits, as in the original project: position (x, y), intensity and
           gradient (Gx, Gy), each group standardised with weight 1 (time is 0 for still images and
           left out): 5 dimensions, through Codebook.fit_data. The same rule on both sides: the
           same number of Lloyd iterations (--kmeans_iters, the project's 30), tolerance 0 on both
           (each stops early only at a fixed point; the iterations run are reported). Both final
           inertias are computed by the same float64 function.
  web      the page in Debian's Chromium (imagegpt/web_bench.py): the static export of --web_ckpt running
           the model in the browser (onnxruntime-web; model.onnx and model_quantized.onnx) vs the same page
           through serve.py (PyTorch), at 1 and 2 threads: classification latency (p50, p99 ms per drawing)
           and drawings/s at batch 1 and 8, timed in the page. Not in the default sections (it needs
           chromium, `npm ci` and a checkpoint).
  threads  milliseconds per call of the demo-sized GPT's work (a training step, batch 32 x 54; the service's
           classification and drawing of one image) idle and beside other jobs (a Python busy loop, another
           torch job, a numpy job), at torch's default threads (every core: what the commands ran with
           before), at one thread, and at the count the commands choose now (imagegpt/thread_bench.py).
           Not in the default sections (it starts busy processes beside itself for a minute or two).
  memory   peak memory of a training step and of a sampling call, each side: on CUDA the
           allocator's peak (torch.cuda.max_memory_allocated) above what was allocated before; on
           Linux the growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs)
           above the RSS before the call.

Repetitions alternate the sides (the order flips every repetition) and medians are reported,
so that the ratios hold on a shared machine whose absolute speed drifts; the JSON also has the
ratios of median process CPU time. Every side uses the same threads (torch's, onnxruntime's and
scikit-learn's): --threads N, or by default (0) the count the commands choose (imagegpt/device.py: the
machine's CPUs less those other jobs keep busy, when the run starts), which the JSON records with the CPU,
its flags and the kernels taken (machine.threads_choice, machine.kernels). With more threads than free
cores every parallel region waits for a thread that a neighbour has preempted, which swamps small ops
(a sampling step) on both sides alike; --threads 1 compares single cores.

bench.py parses the options and prints; the measurements are library modules: imagegpt/benchmark.py runs the
sections of imagegpt/train_bench.py, sample_bench.py, kmeans_bench.py, web_bench.py and thread_bench.py
(timing and memory: imagegpt/measure.py; FLOPs and the matmul ceiling: flops.py; the table: bench_report.py).

On CUDA ours is compiled (torch.compile, as train.py does) and uses fused AdamW; the run also checks
that a bf16 training step of ours runs with the flash SDPA kernel forced (cuda_checks in the JSON);
our k-means runs on the GPU (as prepare.prepare does), scikit-learn on the CPU.
"""
import sys

from imagegpt import benchmark
from imagegpt.bench_report import format_report
from imagegpt.benchmark import SECTIONS, default_length, demo_config, ints
from imagegpt.cli import parser, run_cli
from imagegpt.device import THREADS_ENV
from imagegpt.errors import UserError
from imagegpt.files import check_file
from imagegpt.provenance import write_result
from imagegpt.thread_bench import JOBS
from model import GPTConfig

# --preset gpu: the GPU table of docs/performance.md in one run on a CUDA GPU (about 5 minutes on an H200): the v2
# model's training step at lengths 512 and 53 (tokens/s, MFU, peak memory; bf16 and fp32, compiled),
# sampling at batch 1, 16 and 256 for the v2 and demo models, the CUDA checks (flash SDPA, fused
# AdamW), all written to gpu_bench.json. Later arguments override these (the tests run it with
# --device cpu and tiny sizes).
PRESETS = {"gpu": ["--device", "cuda", "--only", "train,sample,sample_demo", "--sample_batches", "1,16,256",
                   "--json", "gpu_bench.json"]}


def build_parser():
    ap = parser(__doc__, prog="bench.py")
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="gpu: the GPU table of docs/performance.md in one run (see PRESETS; later arguments override it)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and 100,000 k-means vectors")
    ap.add_argument("--json", metavar="OUT", help="write all figures to this JSON file")
    ap.add_argument("--only", default="train,sample,sample_demo,kmeans",
                    help="sections to run: train, sample (the model of --n_layer etc.), sample_demo (the demo "
                         "model of config/demo.yaml), kmeans (default: %(default)s)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for torch, onnxruntime and scikit-learn; 0: chosen from what the machine offers "
                         f"now (its CPUs, cgroup quota and other processes' load), unless {THREADS_ENV} or "
                         "OMP_NUM_THREADS sets them (default: %(default)s)")
    ap.add_argument("--n_layer", type=int, default=6, help="transformer blocks of the benchmarked model (default: %(default)s)")
    ap.add_argument("--n_head", type=int, default=8, help="its attention heads (default: %(default)s)")
    ap.add_argument("--n_embd", type=int, default=384, help="its width (default: %(default)s)")
    ap.add_argument("--block_size", type=int, default=512, help="its block size (default: %(default)s)")
    ap.add_argument("--vocab_size", type=int, default=516, help="codes + 16 (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=16, help="training batch (default: %(default)s)")
    ap.add_argument("--lengths", help="training sequence lengths, long first (default: block size and "
                                      f"the default tokenisation's {default_length()})")
    ap.add_argument("--sample_batches", default="1,16", help="sampling batch sizes (default: %(default)s)")
    ap.add_argument("--new_tokens", type=int, default=default_length(),
                    help="tokens generated per row (default: %(default)s, one default image after <IMG>)")
    ap.add_argument("--reps", type=int, help="timed repetitions per measure (default: by measure and mode)")
    ap.add_argument("--warmup", type=int, help="untimed calls before timing (default: 2, --quick 1)")
    ap.add_argument("--kmeans_n", type=int, help="feature vectors (default: 300000, --quick 100000)")
    ap.add_argument("--kmeans_k", type=int, default=500, help="k-means clusters (default: %(default)s)")
    ap.add_argument("--kmeans_iters", type=int, default=30,
                    help="Lloyd iterations on both sides (default: %(default)s, the project's)")
    ap.add_argument("--kmeans_data", default="digits", choices=["digits", "random"],
                    help="k-means on the built-in digits' features or on random blobs (default: %(default)s)")
    ap.add_argument("--matmul_n", type=int, help="side of the square peak matmul (default: 2048; CUDA 8192)")
    ap.add_argument("--thread_jobs", default="idle,busy,torch,numpy",
                    help="threads: the other jobs to time beside: idle, busy (a Python loop), torch, numpy "
                         "(default: %(default)s)")
    ap.add_argument("--web_ckpt", default="runs/demo/final",
                    help="web: the checkpoint whose page is timed (default: %(default)s)")
    ap.add_argument("--web_threads", default="1,2", help="web: WebAssembly and torch threads to time (default: %(default)s)")
    ap.add_argument("--web_n", type=int, default=200, help="web: timed classifications per row (default: %(default)s)")
    return ap


def check_args(args):
    """The options -> (sections, the GPTConfig benchmarked, training lengths, sampling batch sizes), checked."""
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    if not sections or sections - set(SECTIONS):
        raise UserError(f"--only: choose from {', '.join(SECTIONS)}; got {args.only!r}")
    for k in ("n_layer", "n_head", "n_embd", "block_size", "batch", "reps", "kmeans_n", "kmeans_k",
              "kmeans_iters", "matmul_n"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise UserError(f"--{k} must be at least 1, got {getattr(args, k)}")
    if args.warmup is not None and args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    mcfg = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                     n_embd=args.n_embd)
    if args.n_embd % args.n_head:
        raise UserError("--n_embd must be divisible by --n_head")
    if args.vocab_size <= 16:
        raise UserError("--vocab_size must be more than 16 (6 specials and 10 class tokens besides the codes)")
    lengths = ints(args.lengths, "--lengths") if args.lengths else [args.block_size, default_length()]
    if max(lengths) > args.block_size:
        raise UserError(f"--lengths: {max(lengths)} exceeds --block_size {args.block_size}")
    for name, block in (("sample", args.block_size), ("sample_demo", demo_config(args.vocab_size).block_size)):
        if name in sections and not 1 <= args.new_tokens < block:
            raise UserError(f"--new_tokens must be in 1..{block - 1} (the block size of the {name} model)")
    if args.threads < 0:
        raise UserError("--threads must be 0 (auto) or a positive number")
    batches = ints(args.sample_batches, "--sample_batches")
    ints(args.web_threads, "--web_threads")
    jobs = [j.strip() for j in args.thread_jobs.split(",") if j.strip()]
    if not jobs or set(jobs) - set(JOBS):
        raise UserError(f"--thread_jobs: choose from {', '.join(JOBS)}; got {args.thread_jobs!r}")
    if args.web_n < 1:
        raise UserError(f"--web_n must be at least 1, got {args.web_n}")
    benchmark.check_fits(args, sections, mcfg, lengths, batches)
    return sections, mcfg, lengths, batches


def expand_preset(argv):
    """--preset NAME -> its arguments first, so that any argument given after it still wins."""
    argv = list(argv)
    if "--preset" in argv:
        i = argv.index("--preset")
        name = argv[i + 1] if i + 1 < len(argv) else ""
        if name not in PRESETS:
            raise UserError(f"--preset: choose from {', '.join(PRESETS)}; got {name!r}")
        argv = PRESETS[name] + argv[:i] + argv[i + 2:]
    return argv


def main(argv=None):
    argv = expand_preset(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    checked = check_args(args)
    if args.json:
        check_file(args.json, "JSON file")   # before minutes of measuring
    out = benchmark.run(args, checked, " ".join(["python bench.py"] + argv))
    if args.json:
        write_result(args.json, out, command=out["command"], config=args,
                     dtype="per row (each side's precision is in its key)")
    print(format_report(out))
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
