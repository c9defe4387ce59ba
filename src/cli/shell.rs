//! What a packager installs beside the binary, generated from the clap
//! definitions of [`Cli`](super::Cli) so that it never drifts from them:
//! shell completion scripts (`nodetunnel completions bash|zsh|fish`,
//! clap_complete) and the manual pages (`nodetunnel man`, clap_mangen).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::CommandFactory;

use super::Cli;

/// The shells `nodetunnel completions` writes a script for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CompletionShell {
    /// bash (bash-completion): install as
    /// `/usr/share/bash-completion/completions/nodetunnel`.
    Bash,
    /// zsh: install as `_nodetunnel` in a directory of `$fpath`
    /// (`/usr/share/zsh/vendor-completions/`).
    Zsh,
    /// fish: install as
    /// `/usr/share/fish/vendor_completions.d/nodetunnel.fish`.
    Fish,
}

impl CompletionShell {
    fn generator(self) -> clap_complete::Shell {
        match self {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
            CompletionShell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// Write the completion script of `shell` to `out`.
pub fn completions(shell: CompletionShell, out: &mut dyn Write) {
    clap_complete::generate(shell.generator(), &mut Cli::command(), "nodetunnel", out);
}

/// Write the manual page `nodetunnel(1)` (roff) to `out`.
pub fn man_page(out: &mut dyn Write) -> std::io::Result<()> {
    clap_mangen::Man::new(Cli::command()).render(out)
}

/// Write `nodetunnel.1` and one page per subcommand (`nodetunnel-serve.1`,
/// `nodetunnel-keys-generate.1`, ...) into `dir`.
pub fn man_pages_to(dir: &Path) -> std::io::Result<()> {
    clap_mangen::generate_to(Cli::command(), dir)
}

/// `nodetunnel completions SHELL`.
pub fn run_completions(shell: CompletionShell) -> ExitCode {
    let mut out = std::io::stdout().lock();
    completions(shell, &mut out);
    match out.flush() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodetunnel completions: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `nodetunnel man [--dir DIR]`.
pub fn run_man(dir: Option<&Path>) -> ExitCode {
    let written = match dir {
        Some(dir) => man_pages_to(dir).map_err(|e| format!("{}: {e}", dir.display())),
        None => {
            let mut out = std::io::stdout().lock();
            man_page(&mut out)
                .and_then(|()| out.flush())
                .map_err(|e| e.to_string())
        }
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodetunnel man: {e}");
            ExitCode::FAILURE
        }
    }
}
