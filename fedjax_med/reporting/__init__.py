"""Privacy report figures: utility against epsilon, attack ROC curves, audits, reconstructions."""
