"""Export a pipeline.distill checkpoint as a Hugging Face model directory.

    python tools/export_hf.py RUN_DIR/ckpt OUT [--tag step00000100]

OUT holds model.safetensors (fp32, consolidated from the ZeRO shards), config.json and the
tokenizer: `AutoModelForCausalLM.from_pretrained(OUT)` and lm-eval load it directly.
"""

import argparse

from pipeline.stage2_distill.export import export_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="checkpoint directory (RUN_DIR/ckpt)")
    ap.add_argument("out", help="output directory")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
    args = ap.parse_args()
    print(export_checkpoint(args.ckpt, args.out, args.tag))


if __name__ == "__main__":
    main()
