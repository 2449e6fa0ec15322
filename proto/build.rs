fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        // Block payloads are shared between replica fan-out tasks without copying.
        .bytes(".shoal.block.v1")
        .bytes(".shoal.ns.v1.Write.data")
        .bytes(".shoal.ns.v1.NsReply.data")
        .compile_protos(
            &[
                "proto/control.proto",
                "proto/block.proto",
                "proto/namespace.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
