"""The webhook server: HTTP app, Jotform parsing, safe downloads, the job worker."""
