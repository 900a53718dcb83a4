"""Images in, batches out: MVTec-layout folder discovery and checks, decoding,
the VisA converter and TFDS builder, the built-in synthetic category, the
geometry of model sizes, aspect ratio and tiles, and the tf.data and
in-memory loaders. Nothing about models; imports only common/."""
