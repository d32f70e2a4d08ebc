//! The expression language: Vector's VRL. Programs compile once when a pipeline loads
//! (a compile error names the processor and shows VRL's diagnostic); each run works on
//! the event's parsed document.

use std::sync::OnceLock;

use vrl::compiler::runtime::Runtime;
use vrl::compiler::{compile, Function, Program, TargetValue, TimeZone};
use vrl::value::{Secrets, Value};

fn functions() -> &'static [Box<dyn Function>] {
    static FNS: OnceLock<Vec<Box<dyn Function>>> = OnceLock::new();
    FNS.get_or_init(vrl::stdlib::all)
}

/// A compiled VRL program.
pub struct Vrl {
    program: Program,
    runtime: Runtime,
    timezone: TimeZone,
    source: String,
}

impl std::fmt::Debug for Vrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vrl").field("source", &self.source).finish()
    }
}

/// What a run produced.
pub struct VrlOutput {
    /// The program's value (for conditions, the boolean).
    pub value: Value,
    /// The document after the run (for remaps, the new event).
    pub document: Value,
}

impl Vrl {
    /// Compiles `source`; the error is VRL's diagnostic, ready to print.
    pub fn compile(source: &str) -> Result<Vrl, String> {
        let result = compile(source, functions()).map_err(|diagnostics| {
            vrl::diagnostic::Formatter::new(source, diagnostics).to_string().trim_end().to_owned()
        })?;
        Ok(Vrl {
            program: result.program,
            runtime: Runtime::new(Default::default()),
            timezone: TimeZone::default(),
            source: source.to_owned(),
        })
    }

    /// Compiles a condition: a program that reads the event and never changes it (a
    /// condition that assigned would change events it lets through, or half change one
    /// whose test then failed and goes to the dead letters).
    pub fn compile_condition(source: &str) -> Result<Vrl, String> {
        let vrl = Vrl::compile(source)?;
        if !vrl.program.info().target_assignments.is_empty() {
            return Err("a condition may not change the event (it assigns to a field); use a remap for that".into());
        }
        Ok(vrl)
    }

    /// Whether a run can fail (the program calls a fallible function with `!` or can
    /// `abort`); a program that cannot always hands back its document.
    pub fn can_fail(&self) -> bool {
        let info = self.program.info();
        info.fallible || info.abortable
    }

    /// What the compiler knows of the program: what it reads and assigns, whether it
    /// can fail.
    pub fn info(&self) -> &vrl::compiler::ProgramInfo {
        self.program.info()
    }

    /// The program text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Runs the program on `document` (taken and given back in the output).
    pub fn run(&mut self, document: Value) -> Result<VrlOutput, String> {
        let (result, document) = self.resolve(document);
        result.map(|value| VrlOutput { value, document })
    }

    /// Runs a condition: true only for a boolean `true` result. `document` is given
    /// back whatever the outcome; a condition compiled by [`Vrl::compile_condition`]
    /// never changes it, so an event whose condition failed leaves as it came.
    pub fn test(&mut self, document: &mut Value) -> Result<bool, String> {
        let (result, given_back) = self.resolve(std::mem::replace(document, Value::Null));
        *document = given_back;
        match result? {
            Value::Boolean(b) => Ok(b),
            other => Err(format!("condition returned {} instead of a boolean", other.kind_str())),
        }
    }

    /// The program's result and the document after it ran (after a failure: as far as
    /// the program got).
    fn resolve(&mut self, document: Value) -> (Result<Value, String>, Value) {
        let mut target =
            TargetValue { value: document, metadata: Value::Object(Default::default()), secrets: Secrets::default() };
        let result = self.runtime.resolve(&mut target, &self.program, &self.timezone);
        self.runtime.clear();
        (result.map_err(|e| e.to_string()), target.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(json: &str) -> Value {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn conditions_and_remaps_run_on_documents() {
        let mut cond = Vrl::compile("to_float!(.temp) > 20.0 && starts_with(string!(.device), \"s\")").unwrap();
        assert!(cond.test(&mut doc(r#"{"temp":25,"device":"s1"}"#)).unwrap());
        assert!(!cond.test(&mut doc(r#"{"temp":15,"device":"s1"}"#)).unwrap());
        assert!(cond.test(&mut doc(r#"{"temp":25}"#)).is_err(), "string! on a missing field is a runtime error");
        let err = Vrl::compile(".temp > 20").unwrap_err();
        assert!(err.contains("E100"), "a comparison of unknown types must handle its error: {err}");
        let mut remap = Vrl::compile(".f = .c * 9.0 / 5.0 + 32.0\ndel(.c)").unwrap();
        let out = remap.run(doc(r#"{"c":100.0}"#)).unwrap();
        assert_eq!(serde_json::to_string(&out.document).unwrap(), r#"{"f":212.0}"#);
    }

    #[test]
    fn conditions_may_not_assign_and_infallible_programs_cannot_fail() {
        let err = Vrl::compile_condition(".x = 1\ntrue").unwrap_err();
        assert!(err.contains("may not change the event"), "{err}");
        assert!(Vrl::compile_condition(".level == \"error\"").is_ok());
        assert!(!Vrl::compile(".a = 1").unwrap().can_fail());
        assert!(Vrl::compile(".a = to_int!(.b)").unwrap().can_fail());
        assert!(Vrl::compile("abort").unwrap().can_fail());
    }

    #[test]
    fn compile_errors_are_diagnostics() {
        let err = Vrl::compile(".a = ").unwrap_err();
        assert!(err.contains("error"), "{err}");
        let err = Vrl::compile("no_such_function(.a)").unwrap_err();
        assert!(err.contains("no_such_function"), "{err}");
    }
}
