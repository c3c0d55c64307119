"""Load tests (``make loadtest``) and the relay's cost benchmark (``make bench``). See loadtest/README.md."""
