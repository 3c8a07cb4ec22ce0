"""Hand-made word lists that give the model knowledge its training data lacks.

The learned weights only know words seen in training; these lists let an unseen
library name ("polars", "tauri") or a math word in another language still count.
Each list fires as one cue feature whose weight is learned like any other, so a
list word in a non-code request ("a poem about Python") can be outweighed by the
request itself.
"""

from __future__ import annotations


def words(text: str) -> frozenset[str]:
    """The whitespace-separated words of a block of text."""
    return frozenset(text.split())


# Programming languages, libraries, frameworks and tools.
TECH_NAMES = words(
    """
    python java javascript typescript golang rust ruby php perl kotlin swift scala
    haskell elixir erlang clojure lua luau matlab fortran cobol assembly asm nasm
    verilog vhdl vb vbnet visualbasic rstats rlang dart julia ocaml fsharp groovy bash
    zsh powershell sql mysql postgres postgresql sqlite mongodb redis cassandra
    elasticsearch kafka rabbitmq graphql grpc protobuf json yaml toml xml csv html css
    scss sass tailwind bootstrap jquery react reactjs vue vuejs angular svelte nextjs
    nuxt node nodejs npm yarn pnpm deno bun express fastapi flask django rails laravel
    symfony spring springboot dotnet aspnet blazor unity unreal godot roblox pygame
    numpy pandas polars scipy sklearn matplotlib seaborn plotly tensorflow pytorch torch
    keras jax huggingface transformers langchain llamaindex gradio streamlit opencv
    pillow selenium playwright puppeteer cypress jest pytest unittest junit mocha vitest
    webpack vite babel eslint prettier mypy ruff pylint docker dockerfile kubernetes
    kubectl helm terraform ansible nginx apache systemd cron crontab git github gitlab
    jenkins circleci nix nixos linux ubuntu debian windows wsl macos ios android gradle
    maven cmake makefile gcc clang llvm rustc cargo pip conda venv poetry uv virtualenv
    regex regexp api apis sdk cli repo endpoint endpoints backend frontend fullstack
    microservice websocket websockets http https rest restful oauth jwt cors ssl tls ssh
    tcp udp dns localhost stdout stderr stdin vba excel macro macros powerquery dax
    latex shader shaders glsl hlsl cuda opengl vulkan webgl threejs d3 arduino raspberry
    esp32 firmware microcontroller pyspark spark hadoop airflow dbt snowflake bigquery
    databricks s3 ec2 aws azure gcp firebase supabase vercel heroku netlify wordpress
    shopify woocommerce salesforce apex sap abap autohotkey applescript gherkin cucumber
    """
)

# Generic programming vocabulary: weaker evidence, many of these words have everyday
# meanings too ("list", "class", "index").
CODE_WORDS = words(
    """
    function functions func method methods class classes struct structs enum interface
    interfaces trait traits module modules package packages library import imports
    variable variables array arrays list lists dict dictionary hashmap tuple tuples
    string strings integer int float boolean bool pointer pointers null nullptr
    undefined exception exceptions traceback stacktrace segfault bug bugs debug
    debugging compile compiler compiling runtime syntax refactor refactoring unit lambda
    closure async await promise promises callback thread threads threading mutex
    goroutine coroutine coroutines recursion recursive iterator generator decorator
    constructor inheritance polymorphism getter setter query queries schema migration
    orm index script scripts snippet codebase implementation code coding programming
    programmer source implement algorithm algorithms leetcode codeforces hackerrank
    boilerplate
    """
)

# Phrases that ask for code in languages other than English (matched as substrings).
CODE_PHRASES = (
    "función", "funcion", "código", "codigo", "programa en", "script en", "fonction",
    "programme en", "écris un script", "en python", "en java", "funktion", "programmier",
    "quellcode", "skript", "funzione", "codice", "função", "programa que",
    "функци", "код ", "программ", "скрипт",
    "函数", "代码", "程序", "编写", "脚本", "报错", "関数", "コード", "プログラム", "スクリプト", "エラー",
    "함수", "코드", "프로그램",
)  # fmt: skip

# Words of computation, proof and puzzles, in several languages.
MATH_TERMS = words(
    """
    calculate compute solve solving equation equations inequality integral integrals
    derivative derivatives differentiate integrate probability probabilities
    expectation variance deviation median percent percentage ratio ratios
    proportion proportional prove proof theorem lemma deduce deduction infer syllogism
    premise premises conclusion logically knights knaves puzzle riddle remainder
    divisible divisor prime primes factorial permutations permutation combinations
    combinatorics dice coin coins marbles estimate fermi quotient
    fraction fractions decimal polynomial quadratic matrix determinant eigenvalue
    converge convergence geometric arithmetic
    triangle circle radius diameter perimeter angle angles hypotenuse
    velocity cagr roi
    npv irr calcula calcular calcule calculer resuelve resolver résoudre resous
    demuestra demostrar démontrer démontre probabilidad probabilité wahrscheinlichkeit
    berechne berechnen beweise beweisen gleichung ecuación équation equazione calcolare
    calcola dimostra probabilità cuántos cuántas combien quanti quante quantos quantas
    вычисли вычислить реши решить докажи вероятность уравнение сколько
    """
)

# Math phrases, and words in scripts without spaces between words (substrings).
MATH_PHRASES = (
    "计算", "求解", "证明", "概率", "方程", "多少", "几个", "計算", "証明", "確率", "方程式", "いくつ", "何個",
    "계산", "증명", "확률", "방정식", "몇 개",
    "how many", "how much", "wie viele", "wie viel", "what is the probability",
    # Deduction without numbers: how a logic question is usually asked.
    "true or false", "true, false", "follow from", "follows from", "conclude that", "logically follow",
    "must be true", "cannot be true", "who is lying", "telling the truth", "always lie", "always tell the truth",
    "how many ways",
)  # fmt: skip

# Kinship terms: three or more in one prompt ("X is married to Y. They have a child
# called Z ... what is Z to X?") make a family-relations puzzle; a request that only
# mentions one's mother or sister has one or two.
KIN_WORDS = words(
    """
    married husband wife son sons daughter daughters child children mother father parent parents
    brother brothers sister sisters sibling siblings uncle aunt nephew niece cousin cousins
    grandfather grandmother grandson granddaughter grandchild grandchildren grandparent grandparents
    """
)

# Words too common to explain a decision; skipped when writing a reason.
REASON_STOPWORDS = words(
    """
    a an the i you me my we it is are be to of in on at for with and or do does can
    how what why this that these those if so as by from please
    """
)
