//! virtio-vsock (device type 19): guest stream sockets forwarded to host UNIX sockets.

pub mod muxer;
pub mod packet;
