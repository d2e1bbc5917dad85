"""Images per second through the ECL alone and through the full path (the ECL's candidates read
by a vision-language model with image demonstrations), and the share of time spent preprocessing
images, on real Fashion-MNIST pictures with the tiny random-weight CLIP and LLaVA-class models the
tests build (so it runs on a CPU with nothing downloaded; with random weights accuracy means
nothing, and none is reported).

    python eval/bench/images.py [--learn 30] [--ask 10] [--k 5] [--demos 2]

``--learn``/``--ask`` are pictures per class (10 classes; learned from the train file, asked from
the test file). Preprocessing is timed apart, in the same run, on the same pictures: decoding the
stored bytes plus the model's image processor (ECL), and the VLM processor turning each rendered
prompt and its images into tensors (full path).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the tiny-model builders and the Fashion-MNIST reader live in tests/

from icl_cl import ContinualClassifier  # noqa: E402
from icl_cl.backends.hf_images import process_image_prompt  # noqa: E402
from icl_cl.config import ClassifierConfig, EmbedderConfig, LLMConfig, PromptConfig  # noqa: E402
from icl_cl.images import load_image  # noqa: E402
from icl_cl.types import Example  # noqa: E402
from tests.fashion_mnist import load_pictures  # noqa: E402
from tests.tiny_clip import build_tiny_clip  # noqa: E402
from tests.tiny_vlm import build_tiny_vlm, smollm2_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--learn", type=int, default=30, help="pictures per class to learn")
    parser.add_argument("--ask", type=int, default=10, help="pictures per class to classify")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--demos", type=int, default=2, help="image demonstrations per prompt")
    parser.add_argument("--out")
    args = parser.parse_args()
    from transformers import AutoProcessor

    work = Path(tempfile.mkdtemp(prefix="icl-cl-images-"))
    clip_dir = build_tiny_clip(work / "clip")
    vlm_dir = build_tiny_vlm(work / "vlm", smollm2_tokenizer())
    config = ClassifierConfig(
        embedder=EmbedderConfig(model=str(clip_dir), batch_size=32),
        llm=LLMConfig(backend="transformers", model=str(vlm_dir), options={"batch_size": 8}),
        prompt=PromptConfig(demonstrations="knn", n_demonstrations=args.demos),
    )
    train = load_pictures(per_class=args.learn, split="train")
    asked = [load_image(p.png) for p in load_pictures(per_class=args.ask, split="test")]
    clf = ContinualClassifier.open(work / "store", config)
    start = time.perf_counter()
    clf.learn([Example(f"p{i}", labels=[p.label], image=p.png) for i, p in enumerate(train)])
    learn_s = time.perf_counter() - start

    # ECL alone: embed the pictures, rank labels (calibration fitted first, once, not timed).
    clf.predict(asked[:2], k=args.k, use_llm=False)
    start = time.perf_counter()
    clf.predict(asked, k=args.k, use_llm=False)
    ecl_s = time.perf_counter() - start
    clip_processor = AutoProcessor.from_pretrained(clip_dir)
    start = time.perf_counter()
    clip_processor.image_processor(images=[img.pil() for img in asked], return_tensors="pt")
    ecl_pre_s = time.perf_counter() - start

    # Full path: the ECL's candidates and image demonstrations read by the VLM.
    vectors = clf.embedder.encode(asked)
    ranked = clf.memory.candidates(vectors, args.k, clf.memory.resolve_scorer())
    cands = [[label for label, _ in r] for r in ranked]
    reader = clf.reader()
    reader.read(asked[:2], vectors[:2], cands[:2])  # loads the model
    start = time.perf_counter()
    batch = reader.read(asked, vectors, cands)
    read_s = time.perf_counter() - start
    prompts = [r.prompt.text for r in batch.readings if r.prompt is not None]
    vlm_processor = AutoProcessor.from_pretrained(vlm_dir)
    start = time.perf_counter()
    for prompt in prompts:
        process_image_prompt(vlm_processor, prompt)
    read_pre_s = time.perf_counter() - start

    n = len(asked)
    tokens = [r.prompt.tokens for r in batch.readings if r.prompt is not None]
    result = {
        "learned": len(train),
        "asked": n,
        "k": args.k,
        "image_demonstrations": args.demos,
        "learn_images_per_s": len(train) / learn_s,
        "ecl_images_per_s": n / ecl_s,
        "ecl_preprocessing_share": ecl_pre_s / ecl_s,
        "full_path_images_per_s": n / (ecl_s + read_s),
        "llm_read_images_per_s": n / read_s,
        "llm_preprocessing_share": read_pre_s / read_s,
        "prompt_tokens_per_item": sum(tokens) / max(len(tokens), 1),
        "images_per_prompt": sum(len(p.images) for p in prompts) / max(len(prompts), 1),
        "fallbacks": sum(r.fallback is not None for r in batch.readings),
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
