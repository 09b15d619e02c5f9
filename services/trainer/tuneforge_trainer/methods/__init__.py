"""Built-in training methods; each is a module run as `python -m tuneforge_trainer.methods.<name>`."""
