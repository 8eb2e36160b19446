"""What goes into a build or an analysis: image sources, text pools, search vocabularies."""
