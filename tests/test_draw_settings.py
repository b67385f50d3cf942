"""The drawing settings as one object (imagegpt/draw_settings.py): checked once, naming the setting; made
from the command line (sample.py, eval.py generation), a request to the service and an export's model.json;
written by the export as generation_config.json, which transformers reads back and generate() follows;
and the sub-commands of sample.py and eval.py, their older flags still accepted."""
import json
import os

import pytest
import torch
from fixtures import png_size

import eval as ev
import sample as sp
from imagegpt import draw_settings, huggingface, model_card
from imagegpt.checkpoint import Checkpoint
from imagegpt.cli import with_command
from imagegpt.draw_settings import FOR_A_CLASS, DrawSettings
from imagegpt.errors import UserError
from imagegpt.service import GenerateRequest


def test_defaults_and_the_defaults_of_a_drawing_of_a_chosen_class():
    plain = DrawSettings()
    assert (plain.temperature, plain.top_k, plain.top_p, plain.greedy, plain.guidance) == (1.0, 0, 1.0, False, 1.0)
    assert (FOR_A_CLASS.temperature, FOR_A_CLASS.guidance) == (draw_settings.TEMPERATURE, draw_settings.GUIDANCE)
    assert draw_settings.defaults(True) == FOR_A_CLASS and draw_settings.defaults(False) == plain
    assert plain.meta(False) == {"seed": 0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": False}
    assert list(FOR_A_CLASS.meta(True))[-1] == "guidance"                # the JSONL records' key order


@pytest.mark.parametrize("change, message", [
    (dict(temperature=-1.0), "--temperature must be >= 0"),
    (dict(temperature=float("inf")), "--temperature must be a finite number"),
    (dict(top_p=0.0), "--top_p must be in (0, 1]"),
    (dict(top_p=1.5), "--top_p must be in (0, 1]"),
    (dict(top_k=-2), "--top_k must be >= 0"),
    (dict(guidance=-0.5), "--guidance must be >= 0"),
    (dict(guidance=float("nan")), "--guidance must be a finite number"),
    (dict(seed=-1), "--seed must be an integer in 0.."),
    (dict(seed=2 ** 63), "--seed must be an integer in 0.."),
    (dict(max_new_tokens=-1), "--max_new_tokens must be >= 0"),
    (dict(batch_size=0), "--batch_size must be at least 1"),
    (dict(greedy="yes"), "--greedy must be true or false"),
])
def test_every_value_is_checked_once_naming_the_setting(change, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        DrawSettings(**change).check()
    with pytest.raises(UserError, match="model.json: " + message[2:].split()[0]):
        DrawSettings(**change).check("model.json: ")


def test_greedy_with_a_filter_is_refused_and_unknown_settings_too():
    with pytest.raises(UserError, match="--greedy always takes the most likely token: --temperature, --top_k"):
        draw_settings.made({"greedy": True, "top_p": 0.9})
    assert draw_settings.made({"greedy": True}, for_a_class=True).greedy          # a class's defaults stay
    with pytest.raises(UserError, match="colour: not a drawing setting"):
        draw_settings.made({"colour": 1})


def test_made_from_the_command_line_of_sample_and_eval():
    args, s = sp.parse(["--top_p", "0.9", "--seed", "3", "--batch_size", "8"])
    assert args.command == "free" and s == DrawSettings(top_p=0.9, seed=3, batch_size=8)
    assert sp.parse([])[1] == DrawSettings(seed=1337)                           # sample.py's own seed
    _, s = sp.parse(["--class", "3"])                                           # a chosen class: its defaults
    assert (s.temperature, s.guidance, s.seed) == (draw_settings.TEMPERATURE, draw_settings.GUIDANCE, 1337)
    _, s = sp.parse(["draw", "--grid", "--cfg", "2", "--temperature", "1"])    # --cfg: guidance's older name
    assert (s.guidance, s.temperature) == (2.0, 1.0)
    for bad, message in ((["--temperature", "-1"], "--temperature must be >= 0"),
                         (["--guidance", "2"], "--guidance needs a class"),
                         (["--greedy", "--top_k", "3"], "--greedy always takes")):
        with pytest.raises(UserError, match=message):
            sp.parse(bad)
    args = ev.parse(["generation", "--judge", "J", "--top_p", "0.8", "--batch_size", "16"])
    assert args.settings == DrawSettings(temperature=draw_settings.TEMPERATURE, top_p=0.8, guidance=draw_settings.GUIDANCE,
                                         batch_size=16)
    for bad, message in ((["--temperature", "-0.5"], "--temperature must be >= 0"), (["--top_p", "2"], "--top_p must be")):
        with pytest.raises(UserError, match=message):                           # range-checked now, as sample.py's
            ev.parse(["generation", "--judge", "J", *bad])


def test_made_from_a_request_with_its_old_names():
    plain = GenerateRequest.model_validate({"count": 2, "top_p": 0.9, "seed": 4}).settings(for_a_class=False)
    assert plain == DrawSettings(top_p=0.9, seed=4, batch_size=256)
    asked = GenerateRequest.model_validate({"class": 3, "cfg": 2.0}).settings(for_a_class=True)   # the old alias
    assert (asked.guidance, asked.temperature) == (2.0, draw_settings.TEMPERATURE)
    ignored = GenerateRequest.model_validate({"guidance": 5.0}).settings(for_a_class=False)
    assert ignored.guidance == 1.0                                              # guidance needs a chosen class


def test_made_from_an_exports_model_json(tmp_path):
    facts = {"format": "imagegpt-tokens model.json 1", "guidance": 2.5, "temperature": 0.7, "classes": ["a"]}
    s = draw_settings.from_json(facts, "model.json", for_a_class=True)
    assert (s.guidance, s.temperature, s.top_p) == (2.5, 0.7, 1.0)
    with pytest.raises(UserError, match="model.json: temperature must be >= 0"):
        draw_settings.from_json(dict(facts, temperature=-1), "model.json")
    with pytest.raises(UserError, match="model.json: expected a JSON object"):
        draw_settings.from_json([1], "model.json")


def test_the_export_writes_them_for_transformers_generate(tiny, tmp_path):
    """generation_config.json holds the drawing defaults in transformers' fields (top_k 0, not its 50), the
    guidance under its own key; transformers reads them back and generate() samples with them."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from imagegpt import checkpoint
    ck = checkpoint.load(tiny.ckpt)
    out = huggingface.write_export(ck, str(tmp_path / "hf"))
    written = json.load(open(os.path.join(out, "generation_config.json")))
    want = draw_settings.defaults(ck.conditional)
    assert {k: written[k] for k in ("do_sample", "temperature", "top_k", "top_p", model_card.GUIDANCE_KEY)} == \
        {"do_sample": True, "temperature": want.temperature, "top_k": 0, "top_p": 1.0,
         model_card.GUIDANCE_KEY: want.guidance}
    g = GenerationConfig.from_pretrained(out)
    assert (g.do_sample, g.temperature, g.top_k, g.top_p) == (True, want.temperature, 0, 1.0)
    assert getattr(g, model_card.GUIDANCE_KEY) == want.guidance and not g.guidance_scale
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = torch.tensor([[ck.vocab.img_id]])
    torch.manual_seed(0)
    a = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6)
    torch.manual_seed(0)
    b = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=True,
                       temperature=want.temperature, top_k=0, top_p=1.0)
    assert torch.equal(a, b)                                   # its defaults are the written settings
    assert "`imagegpt_guidance`" in open(os.path.join(out, "README.md")).read()


def test_decoding_takes_the_settings_whole(tiny):
    """decoding.generate draws as the settings say: the seed makes the generator, max_new_tokens and
    batch_size bound the rows, greedy ignores the seed."""
    from imagegpt import checkpoint
    from imagegpt.decoding import generate
    ck = checkpoint.load(tiny.ckpt)
    prompts = [[ck.vocab.img_id]] * 5
    run = lambda **kw: [r["ids"] for r in generate(ck, prompts, DrawSettings(max_new_tokens=4, **kw))]
    assert run(seed=1) == run(seed=1, batch_size=5) != run(seed=2)
    assert all(len(r) <= 5 for r in run(seed=1))
    assert run(greedy=True, seed=1) == run(greedy=True, seed=9)
    assert isinstance(Checkpoint(ck.model, ck.vocab, None).class_names, list)


# ----------------------------------------------------------------------------- sub-commands

def test_sub_commands_come_first_and_old_flags_still_choose_them():
    flags = sp.OLD_FLAGS
    assert with_command(["--top_p", "0.9"], ["free", "draw"], "free", flags) == ["free", "--top_p", "0.9"]
    assert with_command(["--ckpt", "x", "--complete", "4"], ["free"], "free", flags) == \
        ["complete", "--ckpt", "x", "--num_samples", "4"]
    assert with_command(["--class=7"], ["free"], "free", flags) == ["draw", "--class", "7"]
    assert with_command(["draw", "--grid"], ["free", "draw"], "free", flags) == ["draw", "--grid"]
    assert with_command(["--help"], ["free"], "free", flags) == ["--help"]
    assert with_command(["--ckpt", "x", "--classify", "a.png", "b.png"], ["metrics"], "metrics", ev.OLD_FLAGS) == \
        ["classify", "--ckpt", "x", "a.png", "b.png"]
    assert with_command([], ["metrics"], "metrics", ev.OLD_FLAGS) == ["metrics"]


def test_old_and_new_spellings_draw_the_same(tiny, tmp_path):
    old, new = [str(tmp_path / f"{n}.jsonl") for n in ("old", "new")]
    png = str(tmp_path / "c.png")
    assert sp.main(["--ckpt", tiny.ckpt, "--complete", "3", "--greedy", "--out_png", png, "--out_jsonl", old]) == 0
    assert sp.main(["complete", "--ckpt", tiny.ckpt, "--num_samples", "3", "--greedy", "--out_png", png,
                    "--out_jsonl", new]) == 0
    assert open(old).read() == open(new).read() and png_size(png) == (6 * 88, 2 * 100)


def test_eval_sub_commands_and_their_old_flags(tiny, tmp_path, capsys):
    one = os.path.join(tiny.img_dir, "dog", "01.png")
    assert ev.main(["classify", "--ckpt", tiny.ckpt, one]) == 0
    new = capsys.readouterr().out
    assert ev.main(["--ckpt", tiny.ckpt, "--classify", one]) == 0
    assert capsys.readouterr().out == new and one in new
    out = str(tmp_path / "m.json")
    assert ev.main(["metrics", "--ckpt", tiny.ckpt, "--out", out]) == 0 and os.path.exists(out)
    with pytest.raises(UserError, match="eval.py next: unrecognized arguments: --tta"):
        ev.main(["next", "--ckpt", tiny.ckpt, "<IMG>", "--tta", "2"])
