"""Models: supervised equilibrium networks (ff, rnn, conv-ff, conv-rnn) and few-shot learners (conv-4, MLP)."""
