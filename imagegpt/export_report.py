"""docs/export.md's parity and accuracy table, from the result files of the record's `export` part: the
demo model (the first command's, seed 1337) exported by `hf_export.py --onnx --quantize int8 --check`
(export_parity.json), scored by `eval.py --backend B` on the test split (export_eval_*.json), and the
client without torch (export_client.json)."""
from imagegpt.provenance import KEY

BACKENDS = (("PyTorch (fp32)", "torch", None), ("onnxruntime, `model.onnx` (fp32)", "onnx", "onnx"),
            ("onnxruntime, `model_quantized.onnx` (int8 weights)", "onnx_int8", "onnx-int8"))


def export_parity(results):
    """The table: for each backend, its parity with PyTorch and its test accuracy and loss; then the image
    tokenizer's parity, the client's agreement, and the machine."""
    parity = results.load("export_parity.json")
    scored = {key: results.load(f"export_eval_{key}.json") for _, key, _ in BACKENDS}
    rows = ["| | max \\|logit difference\\| vs PyTorch (random sequences; full / step by step through the cache) "
            "| greedy tokens | test accuracy | test loss |", "|---|---|---|---:|---:|"]
    for name, key, backend in BACKENDS:
        run = scored[key]           # eval.py's report of one checkpoint
        same = key != "torch" and run["confusion"] == scored["torch"]["confusion"]
        acc = f"{100 * run['accuracy']:.1f} %" + (" (the same confusion matrix)" if same else "")
        if backend is None:
            rows.append(f"| {name} | | | {acc} | {run['loss']:.5f} |")
            continue
        p = parity[backend]
        greedy = f"identical ({p['greedy_tokens']} tokens)" if p["greedy_equal"] else "differ"
        rows.append(f"| {name} | {p['max_abs_logit_diff']:.2g} / {p['max_abs_cached_diff']:.2g} | {greedy} | {acc} "
                    f"| {run['loss']:.5f} |")
    t, hf, client = parity["tokenizer"], parity["transformers"], results.load("export_client.json")
    m = parity[KEY]["machine"]
    return "\n".join(rows + [
        "",
        f"Transformers loads the Hugging Face folder unchanged: max |logit difference| {hf['max_abs_logit_diff']:.2g}, "
        f"greedy generation {'identical' if hf['greedy_equal'] else 'different'} over {hf['greedy_tokens']} tokens, "
        f"tokenizer {'identical' if hf['tokenizer_equal'] else 'different'}. The image tokenizer's graphs: "
        f"{t['codes_differing']} of {t['codes']:,} codes differ from `tokenizer.py`, decoded pixels within "
        f"{t['max_abs_pixel_diff']:.2g}. The client without torch: {100 * client['client_accuracy']:.1f} % of the "
        f"{client['images']:,} test images ({client['same_class']:,} given the class PyTorch gives, "
        f"{100 * client['torch_accuracy']:.1f} %). On {m['cpu']}, {m['cpu_count']} cores "
        f"({parity[KEY]['date'][:10]}, commit `{parity[KEY]['commit'][:7]}`)."])
