"""Vision-language inference: images, a video, cached items by uuid, precomputed embeddings.

Works with a local LLaVA-1.5, Qwen2-VL or Qwen2.5-VL checkpoint directory (config.json,
*.safetensors, tokenizer and preprocessor_config.json), e.g. llava-hf/llava-1.5-7b-hf or
Qwen/Qwen2-VL-2B-Instruct downloaded beforehand (jaxmm does not download):

python examples/vision_language.py --model /models/Qwen2-VL-2B-Instruct --image cat.jpg
python examples/vision_language.py --model /models/Qwen2-VL-2B-Instruct --video clip.mp4
"""

from __future__ import annotations

import argparse
import os

from PIL import Image

from jaxmm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="local checkpoint directory")
    ap.add_argument("--image", required=True, help="an image file")
    ap.add_argument("--video", help="a video file (Qwen2-VL / Qwen2.5-VL)")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    files = [os.path.abspath(f) for f in (args.image, args.video) if f]
    media_dir = os.path.commonpath([os.path.dirname(f) for f in files])
    llm = LLM(
        args.model,
        max_model_len=4096,
        limit_mm_per_prompt={"image": 2, "video": 1},
        media_io_kwargs={"video": {"num_frames": 16}},
        allowed_local_media_path=media_dir,  # file:// URLs only from this directory
        enable_mm_embeds=True,
    )
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    image = Image.open(args.image).convert("RGB")

    # 1. chat: media parts go through the model's chat template
    url = "file://" + os.path.abspath(args.image)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}, "uuid": "my-image"},
                {"type": "text", "text": "Describe this image in one sentence."},
            ],
        }
    ]
    print("chat:", repr(llm.chat(messages, greedy)[0].outputs[0].text))

    # 2. the same image again by uuid only: served from the encoder cache, and the prompt's
    #    pages from the prefix cache
    messages[0]["content"][0] = {"type": "image_url", "image_url": None, "uuid": "my-image"}
    out = llm.chat(messages, greedy)[0]
    print("cached:", repr(out.outputs[0].text), f"({out.num_cached_tokens} cached tokens)")

    # 3. generate with a raw prompt: put the model's placeholder where the image goes
    front = llm.engine.mm_frontend()
    placeholder = front.placeholder_text("image")
    prompt = {
        "prompt": f"{placeholder}What colours stand out?",
        "multi_modal_data": {"image": image},
    }
    print("generate:", repr(llm.generate(prompt, greedy)[0].outputs[0].text))

    # 4. a video (Qwen2-VL / Qwen2.5-VL)
    if args.video:
        video = {
            "prompt": f"{front.placeholder_text('video')}What happens in this video?",
            "multi_modal_data": {"video": "file://" + os.path.abspath(args.video)},
        }
        print("video:", repr(llm.generate(video, greedy)[0].outputs[0].text))


if __name__ == "__main__":
    main()
