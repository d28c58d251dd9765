//! containerd's runtime options: which runv configuration file a pod uses.
//!
//! runv reads `/etc/runv/runv.toml` unless the container's runtime options
//! name another file. The options are containerd's generic
//! `runtimeoptions.v1.Options` (what `ctr run --runtime-config-path` sends,
//! and what the CRI plugin sends for `[...runtimes.runv.options]
//! ConfigPath = "..."`), the same message kata's shim reads.

use std::path::PathBuf;

use containerd_shim::protos::protobuf::{
    rt::WireType, well_known_types::any::Any, CodedInputStream,
};

/// The type URL of containerd's generic runtime options.
const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";
/// `string config_path = 2;` of `runtimeoptions.v1.Options`.
const CONFIG_PATH_FIELD: u32 = 2;

/// The configuration file that `options` names, if any. Options of another
/// runtime (runc's, say) name none.
pub fn config_path(options: Option<&Any>) -> Result<Option<PathBuf>, String> {
    let Some(options) = options.filter(|o| !o.type_url.is_empty()) else {
        return Ok(None);
    };
    if options.type_url.trim_start_matches('/') != RUNTIME_OPTIONS_TYPE {
        tracing::info!(type_url = %options.type_url, "ignoring runtime options of another runtime");
        return Ok(None);
    }
    let invalid = |e: String| format!("invalid {RUNTIME_OPTIONS_TYPE} runtime options: {e}");
    let mut input = CodedInputStream::from_bytes(&options.value);
    let mut config_path = None;
    while let Some(tag) = input
        .read_raw_tag_or_eof()
        .map_err(|e| invalid(e.to_string()))?
    {
        let (field, wire_type) = (tag >> 3, tag & 7);
        if field == CONFIG_PATH_FIELD {
            config_path = Some(input.read_string().map_err(|e| invalid(e.to_string()))?);
        } else {
            let wire_type = WireType::new(wire_type)
                .ok_or_else(|| invalid(format!("field {field} has wire type {wire_type}")))?;
            input
                .skip_field(wire_type)
                .map_err(|e| invalid(e.to_string()))?;
        }
    }
    Ok(config_path.filter(|p| !p.is_empty()).map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime_options(fields: &[(u32, &str)]) -> Any {
        let mut value = Vec::new();
        for (field, text) in fields {
            value.push((field << 3 | 2) as u8);
            value.push(text.len() as u8);
            value.extend_from_slice(text.as_bytes());
        }
        Any {
            type_url: RUNTIME_OPTIONS_TYPE.into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn reads_the_config_path() {
        let options = runtime_options(&[(1, "x"), (2, "/etc/runv/other.toml"), (3, "")]);
        assert_eq!(
            config_path(Some(&options)).unwrap(),
            Some(PathBuf::from("/etc/runv/other.toml"))
        );
    }

    #[test]
    fn no_options_or_other_runtimes_name_no_file() {
        assert_eq!(config_path(None).unwrap(), None);
        let mut runc = runtime_options(&[(2, "runc")]);
        runc.type_url = "containerd.runc.v1.Options".into();
        assert_eq!(config_path(Some(&runc)).unwrap(), None);
        assert_eq!(config_path(Some(&runtime_options(&[]))).unwrap(), None);
    }

    #[test]
    fn garbage_is_an_error() {
        let mut options = runtime_options(&[]);
        options.value = vec![0x12, 0x40, b'a'];
        assert!(config_path(Some(&options)).is_err());
    }
}
