"""Fine-tuning as a service: uploaded files, a queue of `tunesmith train` child processes, and their
events and checkpoints, all recorded in one SQLite database beside a storage root."""
