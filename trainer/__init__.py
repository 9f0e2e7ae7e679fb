"""Pure-PyTorch library that trains and evaluates LBGAT-family adversarially robust classifiers."""
