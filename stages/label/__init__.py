"""Label: step values from completions (Monte Carlo, binary search, MCTS) and what the searches share."""
