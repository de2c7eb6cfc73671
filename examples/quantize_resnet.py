"""The main job: see `python examples/quantize_resnet.py --help` (also installed as adaround-quantize-resnet)."""
from adaround_testbed.cli import main

if __name__ == "__main__":
    main()
