"""The repair: bias specifications, mask learning, Newton unlearning, the guard, the pipeline."""
