"""vLLM's spelling: python -m jaxserve.entrypoints.openai.api_server --model ... --port 8000"""
import sys

from jaxserve.server_cli import main

if __name__ == "__main__":
    sys.exit(main())
