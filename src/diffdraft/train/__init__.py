"""Training drafters: data (regenerated responses), block masks, losses, the trainer."""
