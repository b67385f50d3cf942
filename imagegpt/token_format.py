"""The token format: the vocabulary layout and the structure of one image's sequence.

Vocabulary, for K codes and C classes (K=500, C=10 gives the original 516 entries):
    0..5          <PAD> <UNK> <IMG> </IMG> <CLS> <EOS>
    6..6+K-1      <Z_000> ... <Z_{K-1}>     codebook entries
    6+K..6+K+C-1  <CLS_0> ... <CLS_{C-1}>   class labels
A palette codebook (colour images, shape apart from colour: tokenizer.PaletteCodebook) of K patterns
and P palette colours adds, between the codes and the labels, P colours <C_k> and P corrections <D_k>:
    6+K..6+K+P-1         <C_000> ... <C_{P-1}>   palette colours
    6+K+P..6+K+2P-1      <D_000> ... <D_{P-1}>   corrections added to a palette colour
All of them are code tokens: code index k (token id 6 + k) runs over the <Z_k>, then the <C_k>, then
the <D_k>.

One image (the v2 format):  <IMG> <Z_k> x L </IMG> <CLS> <CLS_y> <EOS>
    with a palette: <IMG> <C_a> <D_b> <C_c> <D_d> <Z_k> x L </IMG> ...: the ground's colour and the
                 figure's (COLOUR_TOKENS tokens, each colour a <C_k> then a <D_k>), then the patterns
    the prefix   <IMG> codes </IMG> <CLS>   is what the classifier reads: the logits at <CLS>,
                 restricted to the label tokens, give the class probabilities;
    the tail     </IMG> <CLS> <CLS_y> <EOS>  (TAIL tokens) is never cut: truncation drops image codes.
The v1 tail `</IMG> <CLS> <CLS> <EOS>` carries no label; it is repaired from the record's label field
only when asked.

A class-conditioned sequence (made in training from a v2 one, never stored in files) states the class
BEFORE the image and has no label after it:
    <CLS_y> <IMG> <Z_k> x L </IMG> <EOS>      "draw a y"
    <UNK>   <IMG> <Z_k> x L </IMG> <EOS>      "draw any digit": the class is not stated
<UNK> (id 1, in the seed's vocabulary and otherwise unused) is the "no class" marker, so the
vocabulary is the seed's 516 entries unchanged. Classifier-free guidance decodes the two prompts
`<CLS_y> <IMG>` and `<UNK> <IMG>` side by side (same length, same positions). There is no <CLS> in a
conditioned sequence, so the classifier (the logits at <CLS>) is only ever trained and read on plain
v2 sequences, where no class comes before the image: a stated class can never leak into it.
"""
import numpy as np
import torch

from imagegpt.errors import UserError
from imagegpt.files import read_json, write_json

SPECIALS = ["<PAD>", "<UNK>", "<IMG>", "</IMG>", "<CLS>", "<EOS>"]
TAIL = 4          # </IMG> <CLS> <CLS_y> <EOS>
COLOUR_TOKENS = 4  # with a palette, an image opens with two colours, each a <C_k> and a <D_k>
PREFIX_TAIL = 2   # </IMG> <CLS>: how a classification prefix ends
COND_TAIL = 2     # </IMG> <EOS>: how a class-conditioned sequence ends
NO_CLASS = "<UNK>"  # the "no class" marker that opens an unconditional conditioned sequence
V1_HINT = "pass --repair_v1 to fill it in from the label field"


class Vocab:
    def __init__(self, num_codes, num_classes, palette=0):
        self.num_codes, self.num_classes, self.palette = num_codes, num_classes, palette
        names = lambda prefix, n: [f"<{prefix}_{i:0{max(3, len(str(n - 1)))}d}>" for i in range(n)]
        self.tokens = (SPECIALS + names("Z", num_codes) + names("C", palette) + names("D", palette)
                       + [f"<CLS_{c}>" for c in range(num_classes)])
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.unk_id, self.img_id, self.img_end_id, self.cls_id, self.eos_id = range(6)
        self.code_offset = len(SPECIALS)
        self.code_space = num_codes + 2 * palette       # code indices: the <Z_k>, then <C_k>, then <D_k>
        self.label_offset = self.code_offset + self.code_space

    def __len__(self):
        return len(self.tokens)

    def code_id(self, k):
        return self.code_offset + k

    def label_id(self, c):
        return self.label_offset + c

    def is_code(self, i):
        return self.code_offset <= i < self.label_offset

    def is_label(self, i):
        return self.label_offset <= i < self.label_offset + self.num_classes

    def encode(self, tokens):
        """'<IMG> <Z_001> ...' or a list of token strings -> list of ids (KeyError on unknown)."""
        if isinstance(tokens, str):
            tokens = tokens.split()
        return [self.ids[t] for t in tokens]

    def decode(self, ids):
        return " ".join(self.tokens[i] for i in ids)

    # -- the sequence of one image

    def image_ids(self, codes, label):
        """Code indices of one image (raster order) and its label -> the complete v2 sequence."""
        return self.prefix_ids(codes) + [self.label_id(int(label)), self.eos_id]

    def image_id_rows(self, codes, labels):
        """image_ids for many images at once: codes (n, L) and labels (n,) integer arrays -> (n, L + 5) int64."""
        codes, labels = np.asarray(codes, np.int64), np.asarray(labels, np.int64)
        col = lambda v: np.full((len(codes), 1), v, np.int64)
        return np.concatenate([col(self.img_id), codes + self.code_offset, col(self.img_end_id), col(self.cls_id),
                               (labels + self.label_offset)[:, None], col(self.eos_id)], 1)

    def image_tokens(self, codes, label):
        return self.decode(self.image_ids(codes, label))

    def prefix_ids(self, codes):
        """Code indices -> '<IMG> codes </IMG> <CLS>': what the classifier reads."""
        return [self.img_id] + [self.code_id(int(k)) for k in codes] + [self.img_end_id, self.cls_id]

    def image_codes(self, ids):
        """Code indices of the image part of any sequence (after <IMG>, up to </IMG>, codes only)."""
        out, started = [], ids[:1] != [self.img_id]   # a sequence cut before <IMG> still counts
        for i in ids:
            if i == self.img_id:
                started = True
            elif i == self.img_end_id:
                break
            elif started and self.is_code(i):
                out.append(i - self.code_offset)
        return out

    # -- class-conditioned sequences (generation): the class first, no label after the image

    def cond_prompt(self, label=None):
        """'<CLS_y> <IMG>' (label None: '<UNK> <IMG>', the class not stated): how a drawing starts."""
        return [self.unk_id if label is None else self.label_id(int(label)), self.img_id]

    def conditioned(self, ids, label=None):
        """A complete v2 sequence -> its conditioned form '<CLS_y>|<UNK> <IMG> codes </IMG> <EOS>'."""
        return self.cond_prompt(label) + ids[1:-TAIL] + [self.img_end_id, self.eos_id]

    def is_conditioned(self, ids):
        """Does this sequence start with a stated class (or the no-class marker) before <IMG>?"""
        return len(ids) >= 2 and (ids[0] == self.unk_id or self.is_label(ids[0])) and ids[1] == self.img_id

    def is_cond_complete(self, ids, seq_len):
        """A complete conditioned sequence: marker, <IMG>, seq_len codes, </IMG> <EOS>?"""
        return (len(ids) == seq_len + 2 + COND_TAIL and self.is_conditioned(ids)
                and all(self.is_code(i) for i in ids[2:-COND_TAIL]) and ids[-2:] == [self.img_end_id, self.eos_id])

    def format_mask(self, prompt, seq_len, steps):
        """Which tokens the format allows as each of the next `steps` tokens after `prompt` -> bool
        (steps, V). A prompt that starts an image ('<IMG> codes...', or '<CLS_y>|<UNK> <IMG> codes...')
        continues with codes until the image has seq_len of them, then its tail: '</IMG> <CLS>', one
        label token, '<EOS>' (the class is the model's choice) or, conditioned, '</IMG> <EOS>'; past the
        <EOS>, <PAD>. Any other prompt (one that does not follow the format so far) is not constrained."""
        cond = self.is_conditioned(prompt)
        start = 2 if cond else 1                                     # where the codes begin
        codes = prompt[start:]
        if not (cond or prompt[:1] == [self.img_id]) or len(codes) > seq_len \
                or not all(self.is_code(i) for i in codes):
            return torch.ones(steps, len(self), dtype=torch.bool)
        tail = [[self.img_end_id], [self.eos_id]] if cond else \
            [[self.img_end_id], [self.cls_id], range(self.label_offset, self.label_offset + self.num_classes),
             [self.eos_id]]
        kinds = [range(self.code_offset + lo, self.code_offset + hi) for lo, hi in self.code_ranges(seq_len)] \
            + tail + [[self.pad_id]]                                 # each image position's codes, the tail, <PAD>
        table = torch.zeros(len(kinds), len(self), dtype=torch.bool)
        for row, allowed in zip(table, kinds):
            row[list(allowed)] = True
        return table[(torch.arange(steps) + len(codes)).clamp(max=len(kinds) - 1)]   # past the tail: <PAD>

    def code_ranges(self, seq_len):
        """The code indices [lo, hi) that each of an image's seq_len positions takes: with a palette,
        a <C_k> then a <D_k> for each of its two colours, then patterns <Z_k>; without, any code."""
        K, P = self.num_codes, self.palette
        if not P:
            return [(0, K)] * seq_len
        return ([(K, K + P), (K + P, K + 2 * P)] * (COLOUR_TOKENS // 2) + [(0, K)] * seq_len)[:seq_len]

    def is_complete(self, ids, seq_len):
        """Is this a complete v2 sequence: <IMG>, seq_len codes, </IMG> <CLS> <CLS_y> <EOS>?"""
        return (len(ids) == seq_len + 1 + TAIL and ids[0] == self.img_id
                and all(self.is_code(i) for i in ids[1:-TAIL]) and ids[-4] == self.img_end_id
                and ids[-3] == self.cls_id and self.is_label(ids[-2]) and ids[-1] == self.eos_id)

    def label_probs(self, logits):
        """Logits (..., V) read at <CLS> -> probabilities (..., C) over the label tokens only: the one
        place where the model's class prediction is read out."""
        return logits[..., self.label_offset:self.label_offset + self.num_classes].float().softmax(-1)

    def parse(self, text, what="prompt"):
        """'<IMG> <Z_001> ...' typed by a user -> ids; unknown tokens and empty prompts are one-line errors."""
        toks = text.split() if isinstance(text, str) else []
        if not toks:
            raise UserError(f"{what} is empty; give tokens such as '<IMG> <Z_000>'")
        for t in toks:
            if t not in self.ids:
                codes = f"{self.tokens[self.code_offset]}..{self.tokens[self.label_offset - 1]}" \
                    if self.num_codes else "no code tokens"
                raise UserError(f"{what}: unknown token {t[:40]!r}; valid tokens are <PAD> <UNK> <IMG> </IMG> "
                                f"<CLS> <EOS>, {codes} and <CLS_0>..<CLS_{self.num_classes - 1}>")
        return self.encode(toks)

    def check_record(self, rec, where, repair_v1=False, v1_hint=V1_HINT):
        """One parsed JSONL record {"tokens": "...", "label": y, ...} -> (ids, label), validated; every
        problem is a UserError naming `where` (file:line)."""
        if not isinstance(rec, dict) or not isinstance(rec.get("tokens"), str):
            raise UserError(f'{where}: expected a JSON object with a string field "tokens"')
        label = rec.get("label")
        if not isinstance(label, int) or isinstance(label, bool):
            raise UserError(f'{where}: expected an integer field "label"')
        if not 0 <= label < self.num_classes:
            raise UserError(f"{where}: label {label} is out of range 0..{self.num_classes - 1}")
        toks = rec["tokens"].split()
        try:
            ids = [self.ids[t] for t in toks]
        except KeyError as e:
            raise UserError(f"{where}: unknown token {e.args[0][:40]!r} (not in the vocabulary)") from None
        if len(ids) < 1 + TAIL or ids[0] != self.img_id:
            raise UserError(f"{where}: a sequence must start with <IMG> and end with </IMG> <CLS> <CLS_y> <EOS>")
        if ids[-TAIL:] == [self.img_end_id, self.cls_id, self.cls_id, self.eos_id]:
            if not repair_v1:
                raise UserError(f"{where}: v1 tail '<CLS> <CLS> <EOS>' carries no label; {v1_hint}")
            ids[-2] = self.label_id(label)
        tail = ids[-TAIL:]
        if tail[:2] != [self.img_end_id, self.cls_id] or tail[3] != self.eos_id or not self.is_label(tail[2]):
            raise UserError(f"{where}: expected the tail </IMG> <CLS> <CLS_{label}> <EOS>, got "
                            f"'{' '.join(toks[-TAIL:])}'")
        if tail[2] != self.label_id(label):
            raise UserError(f"{where}: tail says {toks[-2]} but the label field is {label}")
        if not all(self.is_code(i) for i in ids[1:-TAIL]):
            bad = next(t for t, i in zip(toks[1:], ids[1:]) if not self.is_code(i))
            raise UserError(f"{where}: only code tokens ({'<Z_k>, <C_k>, <D_k>' if self.palette else '<Z_k>'}) may "
                            f"stand between <IMG> and </IMG>, found {bad}")
        return ids, label

    # -- files

    def to_dict(self):
        return dict(self.ids)

    def save(self, path):
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d, where="vocab"):
        """Rebuild from a token->id mapping; it must follow the layout rule exactly."""
        if not isinstance(d, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in d.values()):
            raise UserError(f"{where}: expected a JSON object mapping token -> integer id")
        num_codes = sum(1 for t in d if t.startswith("<Z_"))
        num_classes = sum(1 for t in d if t.startswith("<CLS_"))
        palette = sum(1 for t in d if t.startswith("<C_"))
        v = cls(num_codes, num_classes, palette)
        if d != v.ids:
            bad = next((t for t in v.tokens if d.get(t) != v.ids[t]), None)
            bad = bad or next(t for t in d if t not in v.ids)
            colours = f", {palette} <C_k>, {palette} <D_k>" if palette else ""
            raise UserError(f"{where}: token {bad[:40]} has id {d.get(bad)}, expected {v.ids.get(bad)} "
                            f"(layout: 6 specials, {num_codes} <Z_k>{colours}, {num_classes} <CLS_c>)")
        return v

    @classmethod
    def load(cls, path):
        return cls.from_dict(read_json(path, "vocab.json"), where=str(path))


def cls_index(length):
    """Index of <CLS> in a complete sequence of `length` tokens (the tail is fixed)."""
    return length - 3


def has_label_tail(ids):
    """Does a complete sequence end with the label tail (v2), rather than '</IMG> <EOS>' (conditioned)?"""
    return ids[-COND_TAIL] != SPECIALS.index("</IMG>")


def truncate(ids, max_length):
    """Cut a complete sequence to max_length by dropping image codes from the end of the image; the
    tail (</IMG> <CLS> <CLS_y> <EOS>, or </IMG> <EOS> of a conditioned sequence) is always kept."""
    if len(ids) <= max_length:
        return ids
    if max_length < 2 + TAIL:
        raise UserError(f"max_length {max_length} is too short: the tail alone takes {TAIL} tokens")
    tail = TAIL if has_label_tail(ids) else COND_TAIL
    return ids[:max_length - tail] + ids[-tail:]


def fit_prefix(prefix, block_size):
    """Cut a classification prefix '<IMG> ... </IMG> <CLS>' to block_size by dropping image codes,
    as truncate() does in training."""
    if len(prefix) <= block_size:
        return prefix
    return prefix[:block_size - PREFIX_TAIL] + prefix[-PREFIX_TAIL:]


def list_classes(names, most=12):
    """Class names for a message: quoted (a name may hold spaces), the first `most` of many."""
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f", ... ({len(names)} in all)" if len(names) > most else "")


def check_class_names(names, vocab, where):
    """The class names a checkpoint carries -> the list, if it is one distinct name per label token."""
    if not (isinstance(names, list) and len(names) == vocab.num_classes
            and all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names)):
        raise UserError(f"{where}: classes is {str(names)[:80]}, expected {vocab.num_classes} distinct class names "
                        f"(strings), one per label token")
    return names
