"""The LLM2Vec training stages: MNTP, unsupervised SimCSE and supervised contrastive training."""
