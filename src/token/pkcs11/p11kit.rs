//! PKCS#11 modules as p11-kit registers them: one `NAME.module` file per module, read from
//! the package directory (`/usr/share/p11-kit/modules`), the administrator's
//! (`/etc/pkcs11/modules`) and the user's (`$XDG_CONFIG_HOME/pkcs11/modules`, by default
//! `~/.config/pkcs11/modules`).
//!
//! The format (pkcs11.conf(5)): `name: value` lines; blank lines and lines starting with
//! `#` are skipped. `module:` is the library; a relative one lives in p11-kit's module
//! directory (`/usr/lib/<multiarch>/pkcs11`), and an empty one disables the module (a
//! user's file overrides a system one of the same name). `enable-in:` / `disable-in:` list
//! the programs (by executable base name) the module is loaded in or not; mxhsm honours
//! them for its own name, `mxhsm`. A module with `trust-policy: yes` holds certificate
//! anchors, not keys, and is left out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The program name `enable-in:` and `disable-in:` are matched against.
const PROGRAM: &str = "mxhsm";

/// A module p11-kit registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredModule {
    /// The file name without `.module`: what `module-name=` may say.
    pub name: String,
    pub path: PathBuf,
    /// The `.module` file that registered it.
    pub config: PathBuf,
}

/// The Debian/Ubuntu multiarch triplet of this build, if it has one.
pub fn multiarch() -> Option<&'static str> {
    match (std::env::consts::ARCH, std::env::consts::OS) {
        ("x86_64", "linux") => Some("x86_64-linux-gnu"),
        ("aarch64", "linux") => Some("aarch64-linux-gnu"),
        ("arm", "linux") => Some("arm-linux-gnueabihf"),
        ("x86", "linux") => Some("i386-linux-gnu"),
        ("riscv64", "linux") => Some("riscv64-linux-gnu"),
        ("powerpc64", "linux") => Some("powerpc64le-linux-gnu"),
        ("s390x", "linux") => Some("s390x-linux-gnu"),
        _ => None,
    }
}

/// Where p11-kit loads a module from whose `module:` is a relative path.
fn module_dir() -> PathBuf {
    match multiarch() {
        Some(t) if Path::new(&format!("/usr/lib/{t}/pkcs11")).is_dir() => {
            PathBuf::from(format!("/usr/lib/{t}/pkcs11"))
        }
        _ if Path::new("/usr/lib64/pkcs11").is_dir() => PathBuf::from("/usr/lib64/pkcs11"),
        _ => PathBuf::from("/usr/lib/pkcs11"),
    }
}

/// The config directories, lowest precedence first.
fn config_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![
        PathBuf::from("/usr/share/p11-kit/modules"),
        PathBuf::from("/etc/pkcs11/modules"),
    ];
    let user = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(u) = user {
        dirs.push(u.join("pkcs11/modules"));
    }
    dirs
}

/// A `.module` file's fields (a later line wins).
fn parse(text: &str) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            fields.insert(name.trim().to_string(), value.trim().to_string());
        }
    }
    fields
}

/// Whether p11-kit would read a config file of this name: an alphanumeric first, then
/// letters, digits, `_`, `,`, `-` and `.`, ending in `.module`.
fn module_name(file: &str) -> Option<&str> {
    let name = file.strip_suffix(".module")?;
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || "_,-.".contains(c));
    (first_ok && rest_ok).then_some(name)
}

fn listed(value: Option<&String>) -> Option<bool> {
    value.map(|v| {
        v.split([',', ' ', '\t'])
            .filter(|s| !s.is_empty())
            .any(|s| s == PROGRAM)
    })
}

/// The modules registered in `dirs` (lowest precedence first), by name.
fn registered_in(dirs: &[PathBuf]) -> Vec<RegisteredModule> {
    let relative_to = module_dir();
    let mut by_name: BTreeMap<String, Option<RegisteredModule>> = BTreeMap::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for config in files {
            let Some(name) = config
                .file_name()
                .and_then(|f| f.to_str())
                .and_then(module_name)
                .map(str::to_string)
            else {
                continue;
            };
            // A file bigger than any config is not one.
            let Ok(meta) = std::fs::metadata(&config) else {
                continue;
            };
            if !meta.is_file() || meta.len() > 64 * 1024 {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&config) else {
                continue;
            };
            let fields = parse(&text);
            let module = fields.get("module").map(String::as_str).unwrap_or("");
            let disabled = module.is_empty()
                || listed(fields.get("enable-in")) == Some(false)
                || listed(fields.get("disable-in")) == Some(true)
                || fields
                    .get("trust-policy")
                    .is_some_and(|v| v.eq_ignore_ascii_case("yes"));
            let entry = (!disabled).then(|| {
                let p = Path::new(module);
                RegisteredModule {
                    name: name.clone(),
                    path: if p.is_absolute() {
                        p.to_path_buf()
                    } else {
                        relative_to.join(p)
                    },
                    config: config.clone(),
                }
            });
            by_name.insert(name, entry);
        }
    }
    by_name.into_values().flatten().collect()
}

/// The modules p11-kit registers on this system, by name.
pub fn registered() -> Vec<RegisteredModule> {
    registered_in(&config_dirs())
}

/// The module p11-kit registers as `name`.
pub fn by_name(name: &str) -> Option<RegisteredModule> {
    registered().into_iter().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn config_files_are_read_like_p11_kit() {
        let base = tempfile::tempdir().unwrap();
        let (system, user) = (base.path().join("system"), base.path().join("user"));
        write(
            &system,
            "softhsm2.module",
            "# comment\n\nmodule: /opt/softhsm/libsofthsm2.so\ncritical: no\n",
        );
        write(&system, "opensc.module", "module: opensc-pkcs11.so\n");
        write(
            &system,
            "trust.module",
            "module: p11-kit-trust.so\ntrust-policy: yes\n",
        );
        write(
            &system,
            "other.module",
            "module: /x/o.so\nenable-in: seahorse, ssh\n",
        );
        write(
            &system,
            "ours.module",
            "module: /x/ours.so\nenable-in: ssh mxhsm\n",
        );
        write(
            &system,
            "not-here.module",
            "module: /x/n.so\ndisable-in: firefox,mxhsm\n",
        );
        write(&system, "README", "module: /x/readme.so\n");
        write(&system, "_bad.module", "module: /x/bad.so\n");
        // The user disables opensc and moves softhsm2.
        write(&user, "opensc.module", "module:\n");
        write(&user, "softhsm2.module", "module: /home/u/libsofthsm2.so\n");
        let found = registered_in(&[system, user.clone()]);
        let names: Vec<(&str, &Path)> = found
            .iter()
            .map(|m| (m.name.as_str(), m.path.as_path()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("ours", Path::new("/x/ours.so")),
                ("softhsm2", Path::new("/home/u/libsofthsm2.so")),
            ]
        );
        assert_eq!(found[1].config, user.join("softhsm2.module"));
    }

    #[test]
    fn a_relative_module_is_in_p11_kits_module_directory() {
        let base = tempfile::tempdir().unwrap();
        write(base.path(), "a.module", "module: liba.so\n");
        let found = registered_in(&[base.path().to_path_buf()]);
        assert_eq!(found[0].path, module_dir().join("liba.so"));
    }
}
