//! PyTorch `.pth` files written byte by byte, as `torch.save` lays them out: a zip archive
//! (stored entries) holding `archive/data.pkl`, one `archive/data/{key}` per storage and
//! `archive/version`. The pickle is protocol 2, built from the opcodes [`Pickle`] names.
//!
//! The tests use it for what no released file contains: pickles that call `os.system` and its
//! cousins ([`write_malicious_pth`]), and well-formed seeds to mutate in the fuzz tests.

use std::io::Write;
use std::path::Path;

/// A protocol 2 pickle under construction; each method appends opcodes for one value.
#[derive(Debug, Clone, Default)]
pub struct Pickle(Vec<u8>);

impl Pickle {
    /// The `PROTO 2` opening.
    pub fn new() -> Self {
        Self(vec![0x80, 2])
    }

    /// `BINUNICODE`: a str.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
        self
    }

    /// `BININT`: an int.
    pub fn int(&mut self, v: i32) -> &mut Self {
        self.0.push(b'J');
        self.0.extend(v.to_le_bytes());
        self
    }

    /// `BINFLOAT`: a float (big-endian, as the format says).
    pub fn float(&mut self, v: f64) -> &mut Self {
        self.0.push(b'G');
        self.0.extend(v.to_be_bytes());
        self
    }

    /// `GLOBAL`: a reference to `module.name` (a class or function), which an unpickler that
    /// trusts the file imports.
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.0.push(b'c');
        self.0.extend(format!("{module}\n{name}\n").as_bytes());
        self
    }

    /// `MARK`, the start of a tuple, list or dict's items.
    pub fn mark(&mut self) -> &mut Self {
        self.0.push(b'(');
        self
    }

    /// `TUPLE`: the items since the last mark.
    pub fn tuple(&mut self) -> &mut Self {
        self.0.push(b't');
        self
    }

    /// `EMPTY_DICT MARK`: a dict whose items follow, closed by [`Pickle::set_items`].
    pub fn dict(&mut self) -> &mut Self {
        self.0.extend(b"}(");
        self
    }

    /// `SETITEMS`: closes a dict's key, value pairs.
    pub fn set_items(&mut self) -> &mut Self {
        self.0.push(b'u');
        self
    }

    /// `EMPTY_LIST MARK`: a list whose items follow, closed by [`Pickle::appends`].
    pub fn list(&mut self) -> &mut Self {
        self.0.extend(b"](");
        self
    }

    /// `APPENDS`: closes a list's items.
    pub fn appends(&mut self) -> &mut Self {
        self.0.push(b'e');
        self
    }

    /// `REDUCE`: calls the callable below the argument tuple on top. This is how a pickle
    /// runs code.
    pub fn reduce(&mut self) -> &mut Self {
        self.0.push(b'R');
        self
    }

    /// `NEWOBJ`: `cls.__new__(cls, *args)` from the class and argument tuple on top.
    pub fn new_obj(&mut self) -> &mut Self {
        self.0.push(0x81);
        self
    }

    /// `BUILD`: sets the state on top on the object below it (`__setstate__` or `__dict__`).
    pub fn build(&mut self) -> &mut Self {
        self.0.push(b'b');
        self
    }

    /// `callable(*str_args)`, the shape of every code-running payload below.
    pub fn call(&mut self, module: &str, name: &str, str_args: &[&str]) -> &mut Self {
        self.global(module, name).mark();
        for arg in str_args {
            self.str(arg);
        }
        self.tuple().reduce()
    }

    /// An instance of `module.name` with `state` as its `__dict__` (how `argparse.Namespace`
    /// and most user classes are pickled).
    pub fn object(&mut self, module: &str, name: &str, state: &[(&str, &str)]) -> &mut Self {
        self.global(module, name).mark().tuple().new_obj().dict();
        for (key, value) in state {
            self.str(key).str(value);
        }
        self.set_items().build()
    }

    /// A float32 tensor of `shape` (contiguous) over storage `key`, as `torch.save` writes it:
    /// `torch._utils._rebuild_tensor_v2(persistent storage, offset 0, size, stride, False,
    /// OrderedDict())`.
    pub fn tensor(&mut self, key: &str, shape: &[usize]) -> &mut Self {
        let numel: usize = shape.iter().product();
        let mut strides = vec![1; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * shape[i + 1];
        }
        self.global("torch._utils", "_rebuild_tensor_v2").mark();
        self.mark().str("storage").global("torch", "FloatStorage").str(key).str("cpu").int(numel as i32).tuple();
        self.0.push(b'Q'); // BINPERSID: the storage comes from outside the pickle
        self.int(0).mark();
        for &d in shape {
            self.int(d as i32);
        }
        self.tuple().mark();
        for &s in &strides {
            self.int(s as i32);
        }
        self.tuple();
        self.0.push(0x89); // NEWFALSE: requires_grad
        self.global("collections", "OrderedDict").mark().tuple().reduce();
        self.tuple().reduce()
    }

    /// The finished pickle, with `STOP`.
    pub fn finish(mut self) -> Vec<u8> {
        self.0.push(b'.');
        self.0
    }
}

/// A named float32 tensor to store.
#[derive(Debug, Clone)]
pub struct PthTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// The tensors of a state_dict (float tensors by key, as `dino_model::weights::state_dict`
/// gives) to store.
pub fn pth_tensors(state: &std::collections::BTreeMap<String, burn::tensor::TensorData>) -> Vec<PthTensor> {
    state
        .iter()
        .map(|(name, data)| PthTensor {
            name: name.clone(),
            shape: data.shape().to_vec(),
            values: data.iter::<f32>().collect(),
        })
        .collect()
}

/// Writes a `torch.save`-style zip around `pickle`, with `storages` as `archive/data/{key}`.
pub fn write_pth_archive(path: &Path, pickle: &[u8], storages: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    use zip::write::SimpleFileOptions;
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path)?);
    // torch.save stores every entry uncompressed, storages aligned to 64 bytes.
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored)?;
    zip.write_all(pickle)?;
    for (key, bytes) in storages {
        zip.start_file(format!("archive/data/{key}"), stored.with_alignment(64))?;
        zip.write_all(bytes)?;
    }
    zip.start_file("archive/version", stored)?;
    zip.write_all(b"3\n")?;
    zip.finish()?;
    Ok(())
}

/// The pickle items and storages of a flat state_dict: `name -> tensor`, one storage each.
fn state_dict_items(p: &mut Pickle, tensors: &[PthTensor]) -> Vec<(String, Vec<u8>)> {
    let mut storages = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let key = i.to_string();
        p.str(&t.name).tensor(&key, &t.shape);
        storages.push((key, t.values.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    storages
}

/// Writes `tensors` as a plain state_dict `.pth` (what `torch.save(model.state_dict())` gives).
pub fn write_pth(path: &Path, tensors: &[PthTensor]) -> std::io::Result<()> {
    let mut p = Pickle::new();
    p.dict();
    let storages = state_dict_items(&mut p, tensors);
    p.set_items();
    write_pth_archive(path, &p.finish(), &storages)
}

/// One code-running object planted in a malicious file.
#[derive(Debug, Clone)]
pub struct Payload {
    /// Its dotted key in the file (`evil`, `hooks.on_load`).
    pub key: String,
    /// The Python type a reader that does not run it can name (`posix.system`).
    pub python_type: String,
    /// The file it creates when a trusting unpickler (`torch.load(weights_only=False)`) runs
    /// it; `None` for objects that only import something.
    pub marker: Option<std::path::PathBuf>,
}

/// Writes a state_dict `.pth` holding `tensors` beside objects that run code when unpickled
/// by Python: `os.system` (pickled as `posix.system`, as on Linux, and as `os.system`),
/// `builtins.exec`, `builtins.eval`, `subprocess.Popen`, one nested inside a dict, plus an
/// instance of a user class and a bare class reference. Each call creates its own file in
/// `marker_dir`. Also an `args` `argparse.Namespace`, as official checkpoints have. Returns
/// the planted objects.
pub fn write_malicious_pth(path: &Path, tensors: &[PthTensor], marker_dir: &Path) -> std::io::Result<Vec<Payload>> {
    let marker = |name: &str| marker_dir.join(format!("pwned-{name}"));
    let shell = |name: &str| format!("touch '{}'", marker(name).display());
    let mut payloads = Vec::new();
    let mut plant = |key: &str, python_type: &str, file: Option<&str>| {
        payloads.push(Payload { key: key.into(), python_type: python_type.into(), marker: file.map(marker) });
    };
    let mut p = Pickle::new();
    p.dict();
    let storages = state_dict_items(&mut p, tensors);
    p.str("args").object("argparse", "Namespace", &[("arch", "vit_small"), ("out_dim", "65536")]);
    plant("args", "argparse.Namespace", None);
    p.str("evil").call("posix", "system", &[&shell("system")]);
    plant("evil", "posix.system", Some("system"));
    p.str("evil_os").call("os", "system", &[&shell("os")]);
    plant("evil_os", "os.system", Some("os"));
    let exec_code = format!("open({:?}, 'w').close()", marker("exec").display().to_string());
    p.str("evil_exec").call("builtins", "exec", &[&exec_code]);
    plant("evil_exec", "builtins.exec", Some("exec"));
    let eval_code = format!("__import__('os').system({:?})", shell("eval"));
    p.str("evil_eval").call("builtins", "eval", &[&eval_code]);
    plant("evil_eval", "builtins.eval", Some("eval"));
    // subprocess.Popen(['touch', marker]): a list argument.
    p.str("evil_popen").global("subprocess", "Popen").mark().list().str("touch");
    p.str(&marker("popen").display().to_string()).appends().tuple().reduce();
    plant("evil_popen", "subprocess.Popen", Some("popen"));
    p.str("hooks").dict().str("on_load").call("posix", "system", &[&shell("nested")]).set_items();
    plant("hooks.on_load", "posix.system", Some("nested"));
    p.str("payload").object("__main__", "Payload", &[("cmd", &shell("never"))]);
    plant("payload", "__main__.Payload", None);
    p.str("getattr").global("builtins", "getattr");
    plant("getattr", "builtins.getattr", None);
    // Plain data beside them is not an object that runs anything.
    p.str("epoch").int(3).str("lr").float(5e-4);
    p.set_items();
    write_pth_archive(path, &p.finish(), &storages)?;
    Ok(payloads)
}
