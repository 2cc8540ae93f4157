"""The whole fine-tuning flow with the official `openai` client against `tunesmith serve`.

    tunesmith serve --api-key secret --data tunesmith-data &          # in another terminal
    python examples/chatterbot_to_jsonl.py                            # real chat data
    python examples/openai_client.py --key secret --train data/chatterbot/train.jsonl

Upload -> create job -> follow events -> list checkpoints -> chat with the fine-tuned model (streamed).
"""
from __future__ import annotations

import argparse
import time

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 address")
    p.add_argument("--key", required=True, help="an API key the server accepts")
    p.add_argument("--train", required=True, help="chat JSONL training file")
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model (see GET /v1/models)")
    p.add_argument("--epochs", type=int, default=1, help="n_epochs (default 1)")
    args = p.parse_args()

    client = OpenAI(base_url=args.url, api_key=args.key)
    with open(args.train, "rb") as f:
        file = client.files.create(file=f, purpose="fine-tune")
    print(f"uploaded {file.id} ({file.bytes:,} bytes)")
    job = client.fine_tuning.jobs.create(model=args.model, training_file=file.id, suffix="chatterbot",
                                         method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": args.epochs}}})
    print(f"created {job.id}: {job.status}")
    seen = set()
    while True:
        job = client.fine_tuning.jobs.retrieve(job.id)
        for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=50).data):
            if event.id not in seen:
                seen.add(event.id)
                print(f"  [{event.level}] {event.message}")
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(2)
    if job.status != "succeeded":
        raise SystemExit(f"job {job.status}: {job.error}")
    for ckpt in client.fine_tuning.jobs.checkpoints.list(job.id):
        print(f"checkpoint {ckpt.fine_tuned_model_checkpoint}: loss {ckpt.metrics.train_loss:.3f}")
    print(f"\nfine-tuned model: {job.fine_tuned_model}\n> Hello, who are you?")
    stream = client.chat.completions.create(model=job.fine_tuned_model, stream=True, max_tokens=60,
                                            messages=[{"role": "user", "content": "Hello, who are you?"}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
