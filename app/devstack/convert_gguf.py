"""Convert a GGUF checkpoint into a Hugging Face model folder that vLLM can serve.

Run by the vLLM virtualenv's python, not the app's: this file imports only the standard
library, torch and transformers (never ``app.*``)::

    VENV/bin/python convert_gguf.py --gguf /path/model.gguf --out /path/model-dir

The weights are dequantized into dense bfloat16 safetensors; the tokenizer, read from the
same file, is saved next to them with its chat template. The folder is written under a
temporary name and renamed into place at the end, so a half-written folder never looks done.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig


def convert(gguf: Path, out: Path) -> None:
    """Write `gguf` dequantized to bfloat16, with its tokenizer, as an HF folder at `out`."""
    started = time.monotonic()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
    )
    # A model loaded through the GGUF quantizer refuses to be saved. Dequantized, it is a plain
    # dense model: forget the quantizer and drop config.quantization_config, or save_pretrained
    # refuses and vLLM would look for GGUF weights.
    for owner, name in ((model, "hf_quantizer"), (model.config, "quantization_config")):
        if hasattr(owner, name):
            delattr(owner, name)
    model.save_pretrained(str(staging))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"the tokenizer in {gguf} has no chat template")
    tokenizer.save_pretrained(str(staging))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"converted {gguf} -> {out} in {time.monotonic() - started:.1f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--gguf FILE --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--gguf", type=Path, required=True, help="the .gguf file to convert")
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write")
    args = parser.parse_args(argv)
    convert(args.gguf.absolute(), args.out.absolute())


if __name__ == "__main__":
    main()
