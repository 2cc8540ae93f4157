"""A self-hosted fine-tuning service with OpenAI's HTTP API: files, jobs, events, checkpoints, models, chat."""
