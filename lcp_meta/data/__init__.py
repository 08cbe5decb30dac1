"""Data sets and tasks: MNIST, CIFAR-10, Omniglot, sinusoid regression, episode samplers."""
