"""The decoding loop: next-token filters (temperature, top-k, top-p) and batched incremental
generation through the model's key/value cache, optionally with classifier-free guidance. Sampling,
the export checks, the benchmarks and the tests all decode through generate()."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from imagegpt.draw_settings import DrawSettings
from imagegpt.errors import UserError

PLAIN = DrawSettings()
TOP_P_TOL = 1e-6  # a cumulative probability within this of p counts as reaching p (float32 logits
                  # give probabilities good to about 1e-7, so an exact boundary needs a margin)


# ----------------------------------------------------------------------------- sampling filters

def top_k_filter(logits, k):
    """Keep the k largest logits along the last dim, set the rest to -inf.

    Ties: every token whose logit equals the k-th largest value is kept, so more than k tokens
    survive when the k-th value is shared (nanoGPT's rule; the result never depends on token ids).
    k None or <= 0, or k >= vocabulary size, keeps everything."""
    if k is None or k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus filter along the last dim: keep the smallest set of most probable tokens whose
    cumulative probability reaches p (within TOP_P_TOL); set the rest to -inf.

    Always keeps at least the most probable token (so a tiny p keeps exactly the argmax); p >= 1
    (or None) keeps every token. Ties: if the probability of the last token needed is shared by
    other tokens, they are all kept (the same rule as top_k_filter)."""
    if p is None or p >= 1:
        return logits
    probs = logits.double().softmax(-1)
    sorted_p = probs.sort(-1, descending=True).values
    before = F.pad(sorted_p.cumsum(-1)[..., :-1], (1, 0))      # mass of the tokens ranked above
    keep = before < p - TOP_P_TOL
    keep[..., 0] = True
    threshold = sorted_p.masked_fill(~keep, float("inf")).amin(-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def choose_next(logits, settings=PLAIN, generator=None):
    """Next token for each row of logits (B, V) as `settings` (DrawSettings) say: argmax if greedy (or
    temperature 0), else sample from softmax(logits / temperature) after top-k, then top-p filtering."""
    temperature = settings.temperature
    if settings.greedy or temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    unusable = lambda t: not bool(t.amax() < float("inf"))   # NaN or +inf anywhere; -inf is a token ruled out
    if unusable(scaled):
        if unusable(logits):
            raise UserError("the model's logits are not finite (NaN or inf): its weights are unusable")
        # a temperature so small that the logits overflow (inf - inf would give NaN probabilities):
        # scale the distances to the largest logit instead, in float64; the largest stays 0 and the
        # others go to -inf, which is the limit of the distribution as the temperature goes to 0
        scaled = (logits.double() - logits.double().amax(-1, keepdim=True)) / temperature
    probs = top_p_filter(top_k_filter(scaled, settings.top_k), settings.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- decoding

def label_prediction(logits, vocab):
    """Logits (V,) at a <CLS> position -> (class, probability, probabilities over the labels)."""
    probs = vocab.label_probs(logits).cpu()
    c = int(probs.argmax())
    return c, probs[c].item(), probs.tolist()


def guide(cond, uncond, scale):
    """Classifier-free guidance: uncond + scale * (cond - uncond), written as cond + (scale - 1) *
    (cond - uncond) so that scale 1 gives the conditional logits exactly (bit for bit)."""
    return cond + (scale - 1) * (cond - uncond)


def no_autograd(device):
    """inference_mode, which skips more of autograd's bookkeeping than no_grad (about 9 % of a
    demo-size decoding step), except under autocast: there it would make autocast cast the weights
    again at every step instead of once per call (its cast cache leaves inference tensors out)."""
    return torch.no_grad() if torch.is_autocast_enabled(torch.device(device).type) else torch.inference_mode()


@dataclass
class Decoding:
    """What every batch of one generate() call shares: the checkpoint (its model and vocabulary), the
    settings and their generator, the format (image_len) and when a row stops."""
    ck: object
    settings: DrawSettings
    generator: torch.Generator
    image_len: int = None       # the codebook's codes per image: decoding is held to the token format
    eos: int = None             # <EOS>'s id, or None: no row stops early (a benchmark's fixed length)
    max_new: int = 0            # most tokens a row adds
    record_logits: bool = False
    progress: bool = False


def generate(ck, prompts, settings=PLAIN, uncond=None, image_len=None, stop_at_eos=True, record_logits=False,
             progress=False):
    """Continue each prompt (a list of token ids) with the checkpoint's model (ck.model, ck.vocab), by
    incremental decoding through the KV cache, drawing each token as `settings` (DrawSettings) say: seeded
    with settings.seed, settings.batch_size rows at a time, each adding up to settings.max_new_tokens
    tokens (0: up to the block size).

    Classifier-free guidance: with `uncond` (one prompt per prompt, of the same length, e.g.
    '<UNK> <IMG>' for '<CLS_7> <IMG>'), both are decoded in one batch through the cache, every step
    chooses from guide(conditional logits, unconditional logits, settings.guidance), and the chosen token
    is fed to both. The recorded logits are the guided ones.

    With image_len (the codebook's codes per image), a prompt that starts an image is continued in the
    format (Vocab.format_mask): codes until the image is whole, then its tail; the model still chooses
    every code and the label. Without it (or for other prompts) any token may follow.

    Prompts of equal length are decoded together (the cache has no padding mask, so rows of a batch
    must stay aligned); results come back in the order of `prompts`. A row stops after <EOS>, after
    max_new_tokens, or when the block size is full (with stop_at_eos=False only the last two stop it:
    a benchmark decodes a fixed number of tokens); finished rows are fed <PAD> until the batch ends,
    and their outputs are ignored. Returns one dict per prompt:
        ids       prompt + generated tokens
        new       number of generated tokens
        stop      'eos', 'max_new_tokens' or 'block_size'
        pred, prob, label_probs   the class prediction from the logits where <CLS> was fed (prompt or
                  generated; the first <CLS>), or None when no <CLS> was fed
        logits    (new, V) the raw logits each new token was chosen from (only with record_logits)
    """
    model = ck.model
    block = model.config.block_size
    job = Decoding(ck, settings, torch.Generator(device=model.device).manual_seed(settings.seed), image_len,
                   ck.vocab.eos_id if stop_at_eos else None, settings.max_new_tokens or block, record_logits, progress)
    results = [None] * len(prompts)
    groups = {}
    if uncond is not None and (len(uncond) != len(prompts) or any(len(u) != len(p) for u, p in zip(uncond, prompts))):
        raise UserError("guidance needs one unconditional prompt per prompt, of the same length")
    for i, p in enumerate(prompts):
        if not p:
            raise UserError("a prompt is empty; it needs at least one token (e.g. <IMG>)")
        if len(p) > block:
            raise UserError(f"a prompt has {len(p)} tokens, more than the model's block size {block}")
        groups.setdefault(len(p), []).append(i)
    was_training = model.training
    model.eval()
    with no_autograd(model.device):
        for L, rows in sorted(groups.items()):
            for s in range(0, len(rows), settings.batch_size):
                chunk = rows[s:s + settings.batch_size]
                out = _generate_aligned(job, [prompts[i] for i in chunk], min(job.max_new, block - L),
                                        None if uncond is None else [uncond[i] for i in chunk])
                for i, r in zip(chunk, out):
                    results[i] = r
    model.train(was_training)
    return results


def _generate_aligned(job, prompts, steps, uncond=None):
    """Decode one batch of equal-length prompts by `steps` tokens at most. The loop keeps everything per
    row in tensors (tokens, finished rows, logits at <CLS>) so that a step is the model call plus a few
    whole-batch ops, with no Python loop over rows; the per-step read backs are whether every row is done
    (none when EOS does not stop) and whether any row chose <CLS> (its logits are kept only then)."""
    model, vocab, eos = job.ck.model, job.ck.vocab, job.eos
    B, L = len(prompts), len(prompts[0])
    device = model.device
    allowed = None if job.image_len is None else \
        torch.stack([vocab.format_mask(p, job.image_len, max(steps, 1)) for p in prompts]).to(device)   # (B, steps, V)
    rows = prompts + (uncond or [])                     # guidance: the unconditional rows follow
    cache = model.new_cache(len(rows), max(L + steps - 1, L))   # the last sampled token is never fed
    logits, _ = model(torch.tensor(rows, device=device), cache=cache)   # prefill: (rows, L, V)

    def mix(lg, j):  # the logits new token j is chosen from: guided, then restricted to the format
        lg = lg if uncond is None else guide(lg[:B], lg[B:], job.settings.guidance)
        return lg if allowed is None else lg.masked_fill(~allowed[:, j], float("-inf"))

    last = mix(logits[:, -1], 0)                                        # (B, V)
    cls_logits = last.new_zeros(B, last.size(-1))   # the logits where <CLS> was first fed, per row
    has_cls = torch.tensor([vocab.cls_id in p for p in prompts], device=device)
    for b, p in enumerate(prompts):
        if vocab.cls_id in p:
            cls_logits[b] = logits[b, p.index(vocab.cls_id)]
    new = torch.full((B, steps), vocab.pad_id, dtype=torch.long, device=device)
    rec = last.new_empty(B, steps, last.size(-1)) if job.record_logits else None
    done = torch.tensor([p[-1] == eos for p in prompts], device=device)   # finished rows are fed <PAD>
    ran = 0
    for step in tqdm(range(steps), desc="sampling", leave=False, disable=not job.progress):
        if eos is not None and bool(done.all()):
            break
        tok = choose_next(last, job.settings, job.generator)
        if eos is not None:   # without EOS no row finishes early
            tok.masked_fill_(done, vocab.pad_id)
        new[:, step] = tok
        if rec is not None:
            rec[:, step] = last
        ran = step + 1
        if eos is not None:
            done |= tok == eos
        if step == steps - 1:
            break
        logits, _ = model((tok if uncond is None else tok.repeat(2))[:, None], cache=cache)
        last = mix(logits[:, -1], step + 1)
        fed_cls = tok == vocab.cls_id
        if bool(fed_cls.any()):   # about once per image: keep the logits of the rows that fed it first
            first_cls = fed_cls & ~has_cls
            cls_logits = torch.where(first_cls[:, None], last, cls_logits)
            has_cls |= first_cls
    return [_result(job, prompts[b], toks, cls_logits[b] if has else None, None if rec is None else rec[b])
            for b, (toks, has) in enumerate(zip(new[:, :ran].tolist(), has_cls.tolist()))]


def _result(job, prompt, toks, cls_logits, rec):
    """One row's result dict (see generate): its new tokens end at the first <EOS>; cls_logits: the
    logits where it fed <CLS> (None: it fed none); rec: its recorded logits (or None)."""
    eos = job.eos
    if prompt[-1] == eos:
        toks = []
    elif eos in toks:
        toks = toks[:toks.index(eos) + 1]
    stopped = "eos" if eos is not None and (prompt[-1] == eos or toks[-1:] == [eos]) else None
    r = {"ids": prompt + toks, "new": len(toks),
         "stop": stopped or ("max_new_tokens" if len(toks) >= job.max_new else "block_size"),
         "pred": None, "prob": None, "label_probs": None}
    if cls_logits is not None:
        r["pred"], r["prob"], r["label_probs"] = label_prediction(cls_logits, job.ck.vocab)
    if rec is not None:
        r["logits"] = rec[:len(toks)].float().cpu()
    return r
