"""The train component: the example model (Ridge) and its thin command-line shell."""
