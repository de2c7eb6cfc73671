"""The experiment harness around adaround_ext, kept apart from the library (which never imports it):
the Fashion-MNIST testbed and ImageNet loaders (testbed), the main job's command line (cli), and the
plain-PyTorch AdaRound that the tests and benchmarks measure the ops against (reference)."""
