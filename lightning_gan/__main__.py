"""``python -m lightning_gan`` is the ``lightning-gan`` command."""

from lightning_gan.cli import main

if __name__ == "__main__":
    main()
